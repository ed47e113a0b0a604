"""Catalog references through the real stages (ingest, embed, generate on SQLite and a local
folder): fitted pictures, weighted and combined references, negative references, the adapter's
step window and named InstantStyle presets, per row, next to plain rows.

What the embed stage caches is compared with CLIP run as diffusers' `encode_image` runs it
(transformers' processor and model from the same folders) on pictures this test pads, tiles and
makes itself, from the methods written out here (ComfyUI_IPAdapter_plus' tiling and
IPAdapterNoise), never with ipbatch's helpers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.jobs import ingest_job, local_context, write_manifest
from helpers.requests import read_rows
from PIL import Image
from sqlalchemy import select
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS
from storage.models import Embedding, Item, ItemEmbedding
from workers.stages import embed, generate


def wide_product(tmp: Path) -> Path:
    """A 3:1 product shot: a grey studio backdrop, a product reaching both ends."""
    pixels = np.full((60, 180, 3), (200, 205, 210), np.uint8)
    pixels[15:45, 4:176] = (180, 30, 40)  # the rug, end to end
    pixels[20:40, 4:20] = (20, 20, 200)  # its blue left end, cropped away by `crop`
    path = tmp / "refs" / "wide.png"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def square(tmp: Path, name: str, colour: tuple[int, int, int]) -> Path:
    rng = np.random.default_rng(sum(colour))
    pixels = (rng.random((64, 64, 3)) * 60).astype(np.uint8) + np.array(colour, np.uint8) // 2
    path = tmp / "refs" / f"{name}.png"
    Image.fromarray(pixels).save(path)
    return path


# --- the methods, written out here -------------------------------------------------------------


def padded_by_hand(image: Image.Image) -> Image.Image:
    """Centred on a square of the median colour of its outermost pixels."""
    a = np.asarray(image)
    edge = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    colour = tuple(int(c) for c in np.median(edge, axis=0))
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def comfyui_tiles(image: Image.Image) -> list[Image.Image]:
    """ComfyUI_IPAdapter_plus IPAdapterTiled's tiles along the long side of a wide picture
    (tile = the short side; at most 4; the overlap spread evenly; start = int(i * (tile -
    overlap)))."""
    tile, length = image.height, image.width
    count = math.ceil(length / tile)
    overlap = max(0, (count * tile - length) / (count - 1 if count > 1 else 1))
    return [
        image.crop((int(x * (tile - overlap)), 0, int(x * (tile - overlap)) + tile, tile))
        for x in range(count)
    ]


def comfyui_noise() -> Image.Image:
    """IPAdapterNoise's default (fade, strength 1, no image): torch.manual_seed(0) after the
    sum of a zero image, torch.rand_like a [1, 224, 224, 3] image, clamped; 8-bit here."""
    image = torch.zeros([1, 224, 224, 3])
    torch.manual_seed(int(torch.sum(image).item()) % 1000000007)
    noise = torch.clamp(torch.rand_like(image), 0, 1)
    return Image.fromarray((noise[0] * 255).round().to(torch.uint8).numpy())


class DiffusersEncoder:
    """`encode_image` as diffusers' SD1.5 pipeline runs it, on the folders it loads."""

    def __init__(self, models: Path, adapter: str) -> None:
        source, preset = ModelSource.parse(str(models)), ADAPTERS[adapter]
        self.model = CLIPVisionModelWithProjection.from_pretrained(source.image_encoder(preset))
        self.processor = CLIPImageProcessor.from_pretrained(source.feature_extractor("sd15"))

    @torch.inference_mode()
    def embeds(self, image: Image.Image) -> torch.Tensor:
        return self.model(self.processor(image, return_tensors="pt").pixel_values).image_embeds

    @torch.inference_mode()
    def hidden(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor(image, return_tensors="pt").pixel_values
        return self.model(pixels, output_hidden_states=True).hidden_states[-2]


# --- through the stages ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Any:
    """A job with one row per new field, and rows that must fail alone, run through ingest,
    embed and generate once for the module: the context, the job and its pictures."""
    tmp_path = tmp_path_factory.mktemp("catalog")
    wide = wide_product(tmp_path)
    a, b = square(tmp_path, "a", (200, 40, 40)), square(tmp_path, "b", (40, 40, 200))
    rows = [
        {"id": "crop", "reference": str(wide)},
        {"id": "pad", "reference": str(wide), "fit": "pad"},
        {"id": "tiles", "reference": str(wide), "fit": "tiles", "adapter": "sd15-plus"},
        {"id": "weighted", "reference": [str(a), str(b)], "weights": [1, 3]},
        {"id": "normed", "reference": [str(a), str(b)], "combine": "norm_average"},
        {"id": "without", "reference": [str(a), str(b)], "combine": "subtract"},
        {"id": "noise", "reference": str(a), "negative_reference": "noise", "end": 0.5},
        {"id": "negative", "reference": str(a), "negative_reference": str(b), "start": 0.5},
        {"id": "style", "reference": str(a), "scale": {"preset": "style", "strength": 0.8}},
        {
            "id": "bad-negative",
            "reference": str(a),
            "negative_reference": str(b),
            "guidance_scale": 1,
        },
        {"id": "bad-fit", "adapter": "sd15-faceid", "reference": str(a), "fit": "tiles"},
    ]
    for row in rows:
        row.setdefault("steps", 2)
    ctx = local_context(tmp_path / "home", tiny_models)
    manifest = write_manifest(tmp_path / "catalog.jsonl", rows)
    job_id, pending = ingest_job(ctx, manifest=manifest, output=tmp_path / "out")
    embed.run(ctx, item_ids=pending)
    generate.run(ctx, item_ids=pending)
    yield {"ctx": ctx, "job": job_id, "wide": wide, "a": a, "b": b}
    ctx.close()


def item_embeddings(ctx: Any, row_id: str) -> list[tuple[int, str, str, Any]]:
    """(reference index, reference URI, kind, cached tensors) of a row's adapter 0."""
    with ctx.sessions.begin() as s:
        found = s.execute(
            s.query(ItemEmbedding.reference_index, ItemEmbedding.reference_uri, Embedding)
            .join(Item, Item.id == ItemEmbedding.item_id)
            .join(Embedding, Embedding.id == ItemEmbedding.embedding_id)
            .filter(Item.row_id == row_id)
            .order_by(ItemEmbedding.reference_index)
            .statement
        ).all()
        return [(i, uri, e.kind, ctx.cache.load(e.uri)) for i, uri, e in found]


def test_each_row_runs_or_fails_alone_with_the_field_named(catalog: dict[str, Any]) -> None:
    ctx = catalog["ctx"]
    with ctx.sessions.begin() as s:
        found = s.execute(
            select(Item.row_id, Item.status, Item.error_code, Item.error_message).where(
                Item.job_id == catalog["job"]
            )
        ).all()
        status = {row_id: (str(st), code, message) for row_id, st, code, message in found}
    failed = {k: v for k, v in status.items() if v[0] != "succeeded"}
    assert set(failed) == {"bad-negative", "bad-fit"}, status
    assert failed["bad-negative"][1] == "invalid_row"
    assert "negative_reference needs guidance_scale > 1" in failed["bad-negative"][2]
    assert failed["bad-fit"][1] == "invalid_row" and "fit: sd15-faceid" in failed["bad-fit"][2]


def test_a_padded_wide_picture_is_embedded_whole(
    catalog: dict[str, Any], tiny_models: Path
) -> None:
    """The done-when: a 3:1 picture with fit pad embeds as CLIP embeds the padded square made
    here; with crop (the default) as CLIP embeds the picture, cropped by its processor."""
    clip = DiffusersEncoder(tiny_models, "sd15")
    wide = Image.open(catalog["wide"]).convert("RGB")
    [(_, _, kind, pad)] = item_embeddings(catalog["ctx"], "pad")
    [(_, _, crop_kind, crop)] = item_embeddings(catalog["ctx"], "crop")
    assert (kind, crop_kind) == ("clip_image_embeds+pad", "clip_image_embeds")  # the fit in the key
    torch.testing.assert_close(pad["pos"], clip.embeds(padded_by_hand(wide)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(crop["pos"], clip.embeds(wide), atol=1e-5, rtol=1e-4)
    assert (pad["pos"] - crop["pos"]).abs().max() > 1e-3  # the ends were seen


def test_tiles_are_comfyuis_each_embedded(catalog: dict[str, Any], tiny_models: Path) -> None:
    clip = DiffusersEncoder(tiny_models, "sd15-plus")
    wide = Image.open(catalog["wide"]).convert("RGB")
    [(_, _, kind, cached)] = item_embeddings(catalog["ctx"], "tiles")
    tiles = comfyui_tiles(wide)
    assert kind == "clip_hidden_states+tiles" and len(tiles) == 3
    expected = torch.cat([clip.hidden(t) for t in tiles])
    torch.testing.assert_close(cached["pos"], expected, atol=1e-5, rtol=1e-4)


def test_negative_references_are_cached_like_references(
    catalog: dict[str, Any], tiny_models: Path
) -> None:
    """At reference index -1, embedded by the adapter's encoder: the noise one is
    ComfyUI's picture, made here."""
    clip = DiffusersEncoder(tiny_models, "sd15")
    noise = item_embeddings(catalog["ctx"], "noise")
    negative = item_embeddings(catalog["ctx"], "negative")
    assert [(i, uri) for i, uri, _, _ in noise] == [(-1, "noise"), (0, str(catalog["a"]))]
    assert [i for i, *_ in negative] == [-1, 0] and negative[0][1] == str(catalog["b"])
    torch.testing.assert_close(
        noise[0][3]["pos"], clip.embeds(comfyui_noise()), atol=1e-5, rtol=1e-4
    )
    b = Image.open(catalog["b"]).convert("RGB")
    torch.testing.assert_close(negative[0][3]["pos"], clip.embeds(b), atol=1e-5, rtol=1e-4)


def test_bad_values_fail_their_row_alone_naming_the_field() -> None:
    one, two = {"reference": "a.png"}, {"reference": ["a.png", "b.png"]}
    bad = {  # the field an error must name -> the row
        "fit": one | {"fit": "stretch"},
        "weights": two | {"weights": [1.0]},
        "subtract": one | {"combine": "subtract"},
        "negative_reference": one | {"adapter": "sd15-faceid", "negative_reference": "noise"},
        "start": one | {"start": 0.8, "end": 0.2},
        "preset": one | {"scale": {"preset": "colour"}},
        "strength": one | {"scale": {"preset": "style", "strength": 5}},
        "adapters[0]: negative_reference needs true_cfg_scale": {
            "adapters": [{"adapter": "flux", "reference": "a.png", "negative_reference": "noise"}]
        },
        "tiles": two | {"fit": "tiles", "combine": "average"},
        "holds none": one | {"steps": 3, "start": 0.4, "end": 0.6},
        "region: fit 'tiles'": two
        | {"fit": "tiles", "combine": "concat", "region": ["l.png", "r.png"]},
    }
    parsed = read_rows(
        {"id": "good"} | one, *({"id": f"bad-{i}"} | row for i, row in enumerate(bad.values()))
    )
    assert parsed[0].row is not None
    for field, found in zip(bad, parsed[1:], strict=True):
        assert found.row is None and found.error is not None and field in found.error, (
            field,
            found.error,
        )
