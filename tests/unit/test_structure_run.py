"""Structure inputs through the real `ipbatch run` (every stage, SQLite, local folder): rows of
each mode come out as the diffusers docs make them, the inputs are prepared once and recorded,
the PNG and the report name them, and each bad input fails its row alone with its code.

The reference side is written out from the diffusers docs (ControlNet with a canny map from
OpenCV, IP-Adapter masks, img2img, inpainting) with diffusers encoding the reference picture
itself: none of ipbatch's helpers. ipbatch runs in float32 and batches rows, so its pixels may
be one uint8 level off a solo run (facts.md); a mistake in the wiring moves them by far more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import diffusers
import numpy as np
import pytest
import sqlalchemy as sa
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from helpers.cli import ipbatch
from PIL import Image, ImageDraw

SIZE = 64
STEPS = 3
LEVELS = 2  # uint8 levels: float32 rounding of a batched call (facts.md: at most 1)


def photo(path: Path, seed: int, size: tuple[int, int] = (96, 80)) -> Path:
    """A picture with edges canny finds (blocks of colour), saved as a file."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle((x, y, x + int(rng.integers(8, 30)), y + int(rng.integers(8, 30))), colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def cut_out(path: Path) -> Path:
    """A product cut-out: a red disc on a transparent background."""
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((15, 15, 65, 65), fill=(200, 30, 30, 255))
    image.save(path)
    return path


def left_half(path: Path) -> Path:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, SIZE // 2 - 1, SIZE), fill=255)
    mask.save(path)
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    refs = tmp_path / "in"
    return {
        "ref": photo(refs / "ref.png", 1),
        "photo_a": photo(refs / "a.png", 2),
        "photo_b": photo(refs / "b.jpg", 3),
        "init": photo(refs / "init.png", 4),
        "cut": cut_out(refs / "cut.png"),
        "left": left_half(refs / "left.png"),
    }


def run(tmp_path: Path, tiny_models: Path, rows: list[dict[str, Any]], **env: str) -> Any:
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    environment = {
        **os.environ,
        "IPBATCH_HOME": str(tmp_path / "home"),
        "IPBATCH_MODELS": str(tiny_models),
        **env,
    }
    result = ipbatch("run", "-q", "m.jsonl", "--output", "out", env=environment, cwd=tmp_path)
    job_id = result.stdout.split()[1].rstrip(":")
    return result, job_id, environment


def common(row_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": row_id,
        "prompt": f"a catalog photo {row_id}",
        "reference": "in/ref.png",
        "steps": STEPS,
        "width": SIZE,
        "height": SIZE,
        "seed": 7,
        **fields,
    }


# -- the reference side: diffusers as its docs show ------------------------------------------


def docs_pipeline(tiny_models: Path, kind: str) -> Any:
    """The docs' pipeline for the use case, the IP-Adapter loaded with its image encoder."""
    base = str(tiny_models / "stable-diffusion-v1-5")
    plain = {"safety_checker": None, "requires_safety_checker": False}
    if kind == "controlnet":
        controlnet = diffusers.ControlNetModel.from_pretrained(
            str(tiny_models / "control_v11p_sd15_canny"), variant="fp16", torch_dtype=torch.float32
        )
        pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
            base, controlnet=controlnet, **plain
        )
    else:
        cls = {
            "text": diffusers.StableDiffusionPipeline,
            "img2img": diffusers.StableDiffusionImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionInpaintPipeline,
        }[kind]
        pipe = cls.from_pretrained(base, **plain)
    pipe.load_ip_adapter(
        str(tiny_models / "IP-Adapter"),
        subfolder="models",
        weight_name="ip-adapter_sd15.safetensors",
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def docs_canny(path: Path, low: int = 100, high: int = 200) -> Image.Image:
    """The ControlNet guide's canny map: OpenCV on the RGB array, three channels."""
    image = np.array(Image.open(path).convert("RGB"))
    edges = cv2.Canny(image, low, high)[:, :, None]
    return Image.fromarray(np.concatenate([edges, edges, edges], axis=2))


def docs_call(pipe: Any, row: dict[str, Any], ref: Path, **arguments: Any) -> np.ndarray:
    pipe.set_ip_adapter_scale(row.get("scale", 0.5))
    image = pipe(
        prompt=row["prompt"],
        ip_adapter_image=Image.open(ref).convert("RGB"),
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(row["seed"]),
        **arguments,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def made(tmp_path: Path, job_id: str, row_id: str) -> np.ndarray:
    return np.asarray(Image.open(tmp_path / "out" / job_id / row_id / "0.png"), dtype=np.int16)


def test_each_mode_comes_out_as_the_diffusers_docs_make_it(
    tmp_path: Path, tiny_models: Path, files: dict[str, Path]
) -> None:
    control_a = {"model": "sd15-canny", "image": "in/a.png", "preprocess": "canny", "scale": 0.7}
    control_b = {"model": "sd15-canny", "image": "in/b.jpg", "preprocess": "canny"}
    rows = [
        # pose-guided shot: two rows with their own maps, strengths and windows, one call
        common("pose-a", control=[control_a], scale=0.5),
        common("pose-b", control=[{**control_b, "scale": 1.3, "start": 0.3}], scale=0.8),
        common("pose-c", control=[control_a], scale=0.6, seed=8),  # a's map, prepared once
        # the garment reference applies to the left half only
        common("garment", region="in/left.png", scale=0.9),
        # the cut-out keeps its product, its transparent background is repainted
        common("background", init_image="in/cut.png", inpaint_mask="alpha"),
        # image to image from a larger photo
        common("variation", init_image="in/init.png", strength=0.6),
    ]
    result, job_id, env = run(tmp_path, tiny_models, rows)
    assert result.returncode == 0, result.stdout + result.stderr

    pipe = docs_pipeline(tiny_models, "controlnet")
    for row_id, path, control in (
        ("pose-a", files["photo_a"], rows[0]["control"][0]),
        ("pose-b", files["photo_b"], rows[1]["control"][0]),
        ("pose-c", files["photo_a"], rows[2]["control"][0]),
    ):
        row = next(r for r in rows if r["id"] == row_id)
        theirs = docs_call(
            pipe,
            row,
            files["ref"],
            image=docs_canny(path),
            controlnet_conditioning_scale=control["scale"],
            control_guidance_start=control.get("start", 0.0),
            width=SIZE,
            height=SIZE,
        )
        assert np.abs(made(tmp_path, job_id, row_id) - theirs).max() <= LEVELS, row_id
    # a row's image is its own map's: pose-b with pose-a's map is another picture
    swapped = docs_call(
        pipe,
        rows[1],
        files["ref"],
        image=docs_canny(files["photo_a"]),
        controlnet_conditioning_scale=1.3,
        control_guidance_start=0.3,
        width=SIZE,
        height=SIZE,
    )
    assert np.abs(made(tmp_path, job_id, "pose-b") - swapped).max() > 10

    pipe = docs_pipeline(tiny_models, "text")
    masks = IPAdapterMaskProcessor().preprocess(
        [Image.open(files["left"])], height=SIZE, width=SIZE
    )
    masks = [masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])]
    theirs = docs_call(
        pipe,
        rows[3],
        files["ref"],
        cross_attention_kwargs={"ip_adapter_masks": masks},
        width=SIZE,
        height=SIZE,
    )
    assert np.abs(made(tmp_path, job_id, "garment") - theirs).max() <= LEVELS

    # inpainting from a cut-out: on white like every picture ipbatch reads; the alpha channel
    # inverted is the mask (transparent = repaint)
    cut = Image.open(files["cut"])
    on_white = Image.alpha_composite(Image.new("RGBA", cut.size, "white"), cut).convert("RGB")
    mask = Image.fromarray(255 - np.asarray(cut)[:, :, 3])
    pipe = docs_pipeline(tiny_models, "inpaint")
    theirs = docs_call(
        pipe,
        rows[4],
        files["ref"],
        image=on_white,
        mask_image=mask,
        strength=1.0,
        width=SIZE,
        height=SIZE,
    )
    assert np.abs(made(tmp_path, job_id, "background") - theirs).max() <= LEVELS

    # img2img: the photo resized to the row's size as diffusers' image processor does (Lanczos)
    init = Image.open(files["init"]).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
    pipe = docs_pipeline(tiny_models, "img2img")
    theirs = docs_call(pipe, rows[5], files["ref"], image=init, strength=0.6)
    assert np.abs(made(tmp_path, job_id, "variation") - theirs).max() <= LEVELS

    # recorded: each item's inputs, prepared once per (image, preparation)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'ipbatch.db'}")
    with engine.connect() as conn:
        linked = conn.execute(
            sa.text(
                "SELECT i.row_id, l.role, l.owner_index, l.position, l.source_uri, e.kind "
                "FROM item_inputs l JOIN items i ON i.id = l.item_id "
                "JOIN embeddings e ON e.id = l.embedding_id ORDER BY i.row_index, l.role"
            )
        ).all()
        prepared = conn.execute(
            sa.text(
                "SELECT kind, COUNT(*) FROM embeddings WHERE encoder = 'inputs-v2' GROUP BY kind"
            )
        ).all()
    engine.dispose()
    base = tmp_path / "in"
    assert [tuple(r) for r in linked] == [
        ("pose-a", "control", 0, 0, str(base / "a.png"), "canny-100-200"),
        ("pose-b", "control", 0, 0, str(base / "b.jpg"), "canny-100-200"),
        ("pose-c", "control", 0, 0, str(base / "a.png"), "canny-100-200"),
        ("garment", "region", 0, 0, str(base / "left.png"), "mask"),
        ("background", "init", 0, 0, str(base / "cut.png"), "rgb"),
        ("background", "mask", 0, 0, str(base / "cut.png"), "alpha"),
        ("variation", "init", 0, 0, str(base / "init.png"), "rgb"),
    ]
    assert dict(prepared) == {"canny-100-200": 2, "mask": 1, "rgb": 2, "alpha": 1}

    # the PNG names its inputs
    meta = json.loads(Image.open(tmp_path / "out" / job_id / "pose-b" / "0.png").text["ipbatch"])
    assert meta["control"][0]["image"] == "in/b.jpg" and meta["control"][0]["scale"] == 1.3
    meta = json.loads(
        Image.open(tmp_path / "out" / job_id / "background" / "0.png").text["ipbatch"]
    )
    assert (meta["init_image"], meta["inpaint_mask"], meta["strength"]) == (
        "in/cut.png",
        "alpha",
        1.0,
    )
    meta = json.loads(Image.open(tmp_path / "out" / job_id / "garment" / "0.png").text["ipbatch"])
    assert meta["adapters"][0]["region"] == "in/left.png"

    # the report shows them next to the references
    report = tmp_path / "report.html"
    assert ipbatch("report", job_id, "-o", str(report), env=env, cwd=tmp_path).returncode == 0
    page = report.read_text()
    assert f"control sd15-canny: {base / 'b.jpg'}" in page
    assert f"region of adapter 1: {base / 'left.png'}" in page
    assert f"init image: {base / 'init.png'}" in page
    assert page.count("<figure class='input'><img src='data:image/jpeg;base64,") == 6


def test_each_bad_input_fails_its_row_alone(
    tmp_path: Path, tiny_models: Path, files: dict[str, Path]
) -> None:
    inside = tmp_path / "in"
    (inside / "notes.png").write_text("not an image")
    Image.new("RGB", (1200, 1000)).save(inside / "huge.png")
    Image.new("RGBA", (40, 40), (9, 9, 9, 255)).save(inside / "opaque.png")
    outside = photo(tmp_path / "elsewhere" / "x.png", 9)
    canny = {"model": "sd15-canny", "preprocess": "canny", "image": "in/a.png"}
    two_refs = {"reference": ["in/ref.png", "in/a.png"], "combine": "concat"}
    cases = [  # (row, its code, what its message says)
        (common("good", control=[canny]), None, None),
        (
            common("mask-not-image", init_image="in/init.png", inpaint_mask="in/notes.png"),
            "reference_not_image",
            "notes.png is not an image",
        ),
        (
            common("control-missing", control=[{**canny, "image": "in/nope.png"}]),
            "reference_not_found",
            "nope.png does not exist",
        ),
        (common("region-outside", region=str(outside)), "reference_forbidden", "x.png"),
        (common("init-huge", init_image="in/huge.png"), "reference_too_large", "1200x1000"),
        (
            common("alpha-on-jpeg", init_image="in/b.jpg", inpaint_mask="alpha"),
            "invalid_row",
            "b.jpg has no alpha channel",
        ),
        (
            common("alpha-all-opaque", init_image="in/opaque.png", inpaint_mask="alpha"),
            "invalid_row",
            "opaque.png has no transparent pixel",
        ),
        (
            common("unknown-net", control=[{**canny, "model": "sd15-scribble"}]),
            "invalid_row",
            "sd15-scribble",
        ),
        (
            common("sdxl-net", control=[{**canny, "model": "sdxl-canny"}]),
            "invalid_row",
            "sdxl-canny is a sdxl ControlNet",
        ),
        (
            common("window", control=[{**canny, "start": 0.6, "end": 0.6}]),
            "invalid_row",
            "start (0.6) must be before end (0.6)",
        ),
        (common("strength", init_image="in/init.png", strength=1.5), "invalid_row", "strength"),
        (
            common(
                "regions", reference=None, adapters=[{**two_refs, "region": ["in/left.png"] * 3}]
            ),
            "invalid_row",
            "one mask for all 2 references or one per reference, not 3",
        ),
    ]
    rows = [{k: v for k, v in row.items() if v is not None} for row, _, _ in cases]
    result, _, _ = run(
        tmp_path,
        tiny_models,
        rows,
        IPBATCH_ALLOWED_SOURCES=str(inside),
        IPBATCH_MAX_IMAGE_PIXELS="1000000",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'ipbatch.db'}")
    with engine.connect() as conn:
        items = conn.execute(
            sa.text("SELECT status, error_code, error_message FROM items ORDER BY row_index")
        ).all()
    engine.dispose()
    assert len(items) == len(cases)
    for (row, code, needle), (status, got, message) in zip(cases, items, strict=True):
        assert (status, got) == ("succeeded" if code is None else "failed", code), (row, message)
        assert needle is None or needle in message, (row["id"], message)
