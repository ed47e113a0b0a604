"""FLUX.1 with XLabs' IP-Adapter (`flux`), on the tiny FLUX.1-dev layout, float64.

The reference side is diffusers' FluxPipeline called as its docs show (`load_ip_adapter(...,
image_encoder_pretrained_model_name_or_path=...)`, `set_ip_adapter_scale`, `pipe(...,
ip_adapter_image=picture, true_cfg_scale=...)`); ipbatch's side is the embed stage's encoder,
the request mapping and the generator with no image encoder. Batched rows with their own
references, scales, seeds, prompts and init images each equal their solo run; the traps of
FLUX's loader and pipeline are regression tests; rows FLUX cannot run fail alone.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline
from helpers.requests import (
    assert_batched_rows_are_solo_runs,
    embedded,
    picture,
    read_rows,
    requests_for,
    with_catalog_fields,
)
from PIL import Image

from pipeline.generator import Generator
from pipeline.inputs import prepare, row_inputs
from pipeline.manifest import Row
from pipeline.models import ModelSource
from pipeline.presets import ADAPTERS
from pipeline.requests import ControlInput, build_request

# equality with diffusers' own pipelines, number for number: torch's business, not the
# interpreter's; Python 3.12 runs the rest (`make test-py312`)
pytestmark = pytest.mark.numerics

CPU = torch.device("cpu")
F64 = torch.float64
SIZE = 32  # FLUX's native size for the tiny model is 256 (128 latent pixels x 2)


@pytest.fixture(scope="module")
def flux(tiny_models: Path) -> Generator:
    return Generator(ModelSource.parse(str(tiny_models)), ("flux",), device=CPU, dtype=F64)


@pytest.mark.parametrize("true_cfg", [None, 3.0])
@pytest.mark.parametrize("mode", ["text", "img2img", "inpaint"])
def test_each_row_of_a_batch_is_its_solo_run(flux: Generator, true_cfg, mode: str) -> None:
    """Three rows (1, 2 and 1 images) with their own references, scales (0.7, 0.3, 0.7),
    prompts and seeds in one call; with and without true CFG; from noise, from init images,
    inpainting; the first two rows with step windows and the second with a negative
    reference (`with_catalog_fields`). Without the per-row fix every row attends to every
    row's reference (FLUX folds the repeated embeds into tokens) and one scale holds for all."""
    rows = requests_for(flux, num_images=[1, 2, 1], guidance=3.5)
    rows[1] = replace(rows[1], adapters=[replace(rows[1].adapters[0], scale=0.3)])
    holes = np.random.default_rng(2).random((SIZE, SIZE)) > 0.5
    mask = Image.fromarray((holes * 255).astype(np.uint8))
    rows = [
        replace(
            r,
            width=SIZE,
            height=SIZE,
            true_cfg_scale=true_cfg,
            negative_prompt="blurry" if true_cfg else "",
            init_image=None if mode == "text" else picture(20 + i, (SIZE, SIZE)),
            strength=None if mode == "text" else 0.7,
            mask=mask if mode == "inpaint" else None,
        )
        for i, r in enumerate(rows)
    ]
    assert_batched_rows_are_solo_runs(flux, with_catalog_fields(rows))


@pytest.fixture(scope="module")
def flux_v2(tiny_models: Path) -> Generator:
    return Generator(ModelSource.parse(str(tiny_models)), ("flux-v2",), device=CPU, dtype=F64)


@pytest.mark.parametrize(
    ("adapter", "true_cfg", "control"),
    [("flux", 1.0, False), ("flux", 4.0, False), ("flux-v2", 4.0, False), ("flux", 4.0, True)],
)
def test_a_row_is_the_docs_pipeline(
    tiny_models: Path,
    request: pytest.FixtureRequest,
    adapter: str,
    true_cfg: float,
    control: bool,
) -> None:
    """The diffusers docs' FLUX IP-Adapter call, the picture encoded by the pipeline's own
    image encoder; ipbatch: the embed stage's encoder, the cached tensors, the request. XLabs'
    v2 file (16 tokens) through the same loader; a canny ControlNet (the docs'
    FluxControlNetPipeline, its scale and step window) beside the adapter; ipbatch prepares
    the control image as its embed stage does."""
    flux: Generator = request.getfixturevalue("flux" if adapter == "flux" else "flux_v2")
    preset = ADAPTERS[adapter]
    reference = picture(5)
    tensors = embedded(tiny_models, adapter, reference)
    row = Row.model_validate(
        {
            "id": "r",
            "adapter": adapter,
            "reference": "ref.png",
            "scale": 0.8,
            "prompt": "a leather bag",
            "negative_prompt": "blurry" if true_cfg > 1 else "",
            "true_cfg_scale": true_cfg,
            "num_images": 2,
            "seed": 4444,
            "steps": 3,
            "width": 64,  # a row's smallest
            "height": 64,
        }
        | (
            {"control": [{"model": "flux-canny", "image": "e.png", "scale": 0.7, "end": 0.6}]}
            if control
            else {}
        )
    )
    edges = picture(6, (64, 64))
    png = io.BytesIO()
    edges.save(png, format="PNG")
    prepared = {
        i.slot: prepare(png.getvalue(), i.kind, name="e.png", max_pixels=10**6, max_bytes=10**6)
        for i in row_inputs(row)
    }
    mine = flux.generate(build_request(row, [[tensors]], prepared)).arrays

    base = str(tiny_models / "FLUX.1-dev")
    extra: dict = {}
    if control:
        net = FluxControlNetModel.from_pretrained(
            str(tiny_models / "FLUX.1-dev-Controlnet-Canny"), torch_dtype=F64
        )
        pipe = FluxControlNetPipeline.from_pretrained(base, controlnet=net, torch_dtype=F64)
        extra = {
            "control_image": edges,
            "controlnet_conditioning_scale": 0.7,
            "control_guidance_end": 0.6,
        }
    else:
        pipe = FluxPipeline.from_pretrained(base, torch_dtype=F64)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(tiny_models / preset.weights.folder),
        weight_name="ip_adapter.safetensors",
        image_encoder_pretrained_model_name_or_path=str(tiny_models / "clip-vit-large-patch14"),
        image_encoder_dtype=F64,
    )
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe(
        width=64,
        height=64,
        prompt="a leather bag",
        negative_prompt="blurry" if true_cfg > 1 else None,
        true_cfg_scale=true_cfg,
        guidance_scale=3.5,  # the card's; FluxControlNetPipeline's own default is 7.0
        num_inference_steps=3,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (4444, 4445)],
        ip_adapter_image=reference,
        output_type="np",
        **extra,
    ).images
    for a, b in zip(mine, theirs, strict=True):  # float64 inside; the np output is float32,
        assert np.abs(a - b).max() < 1e-6  # where a 16th-digit difference can move one ulp


def test_v2_rows_are_16_tokens_and_batch_like_v1(flux_v2: Generator) -> None:
    """diffusers' loader tells v2 by its projection's 65,536 rows (16 tokens of FLUX.1's
    4096): the tiny FLUX has that width, so the same check runs here."""
    assert flux_v2._layers[0].num_image_text_embeds == 16
    rows = requests_for(flux_v2, num_images=[1, 2, 1], guidance=3.5)
    rows[1] = replace(rows[1], adapters=[replace(rows[1].adapters[0], scale=0.3)])
    rows = [replace(r, width=SIZE, height=SIZE) for r in rows]
    assert_batched_rows_are_solo_runs(flux_v2, rows)


@pytest.mark.parametrize("nets", [1, 2])
def test_controlnet_rows_of_a_batch_are_their_solo_runs(flux: Generator, nets: int) -> None:
    """FLUX ControlNet rows (text-to-image: diffusers' FLUX ControlNet img2img and inpaint
    pipelines take no IP-Adapter) with their own control images, ControlNet scales and step
    windows, references and scales in one call; with the same ControlNet twice in a row too
    (FLUX's multi-ControlNet call takes a list per net, SD's a list per slot)."""
    rows = requests_for(flux, num_images=[1, 2, 1], guidance=3.5)
    rows = [
        replace(
            r,
            width=SIZE,
            height=SIZE,
            controls=tuple(
                ControlInput(
                    "flux-canny",
                    picture(30 + 10 * n + i, (SIZE, SIZE)),
                    scale=(1.0, 0.5, 0.8)[i],
                    end=(1.0, 0.6, 1.0)[i],
                )
                for n in range(nets)
            ),
        )
        for i, r in enumerate(rows)
    ]
    solo = assert_batched_rows_are_solo_runs(flux, rows, own_adapters=False)
    # each row's control image and scale had their effect
    first = rows[0].controls[0]
    for changed in (replace(first, scale=0.2), replace(first, image=picture(9, (SIZE, SIZE)))):
        other = replace(rows[0], controls=(changed, *rows[0].controls[1:]))
        assert np.abs(flux.generate(other).arrays[0] - solo[0].arrays[0]).max() > 1e-3


def test_negative_embeds_are_always_given(flux: Generator, monkeypatch) -> None:
    """FluxPipeline given positive embeds alone encodes an all-black picture for the negative
    ones with its image encoder, which a worker fed precomputed embeddings has not loaded:
    an AttributeError even without true CFG. ipbatch always passes its negative embeds."""
    [row] = requests_for(flux, num_images=[1], guidance=3.5)
    row = replace(row, width=SIZE, height=SIZE)
    assert len(flux.generate(row).arrays) == 1
    monkeypatch.setattr(Generator, "_negatives", lambda self, per_adapter: None)
    with pytest.raises(AttributeError):
        flux.generate(row)


def test_rows_flux_cannot_run_fail_alone_with_the_reason() -> None:
    flux = {"id": "f", "adapter": "flux", "reference": "r.png"}
    parsed = read_rows(
        flux,
        {
            "id": "a",
            "adapters": [
                {"adapter": "flux", "reference": "r.png"},
                {"adapter": "sdxl", "reference": "s.png"},
            ],
        },  # fmt: skip
        {
            "id": "b",
            "adapters": [
                {"adapter": "flux", "reference": "r.png"},
                {"adapter": "sd15-faceid", "reference": "f.png"},
            ],
        },  # fmt: skip
        flux | {"id": "c", "negative_prompt": "blurry"},
        flux | {"id": "d", "clip_skip": 2},
        flux | {"id": "e", "region": "m.png"},
        flux | {"id": "g", "scale": {"up": {"block_0": [1.0]}}},
        {"id": "h", "reference": "r.png", "true_cfg_scale": 2.0},
        flux | {"id": "i", "control": [{"model": "sdxl-canny", "image": "c.png"}]},
        flux | {"id": "j", "negative_prompt": "blurry", "true_cfg_scale": 2.0},
        flux
        | {
            "id": "k",
            "init_image": "i.png",
            "control": [{"model": "flux-canny", "image": "c.png"}],
        },
        flux | {"id": "l", "control": [{"model": "flux-canny", "image": "c.png"}]},
    )
    errors = [p.error or "" for p in parsed]
    assert parsed[0].row is not None and parsed[0].row.steps == 28
    assert parsed[0].row.guidance_scale == 3.5  # FLUX.1-dev's defaults
    assert "share one base model" in errors[1] and "share one base model" in errors[2]
    assert "needs true_cfg_scale > 1" in errors[3]
    assert "clip_skip is for SD1.5, SDXL and SD3.5" in errors[4]
    assert "takes no IP-Adapter masks" in errors[5]
    assert "InstantStyle blocks are for SD1.5 and SDXL" in errors[6]
    assert "true_cfg_scale is for FLUX.1 rows" in errors[7]
    assert "ControlNet" in errors[8]
    assert parsed[9].row is not None
    assert "control: flux has no img2img pipeline with ControlNets" in errors[10]
    assert parsed[11].row is not None
