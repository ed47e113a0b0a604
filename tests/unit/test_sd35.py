"""SD3.5 Large with InstantX's IP-Adapter (`sd35`), on the tiny SD3.5 layout, float64.

The reference side is diffusers' StableDiffusion3Pipeline called as its docs show
(`load_ip_adapter(..., image_encoder_folder=<SigLIP>)`, `set_ip_adapter_scale`, `pipe(...,
ip_adapter_image=picture)`); ipbatch's side is the embed stage's encoder (SigLIP's penultimate
hidden states, cached), the request mapping and the generator with no image encoder. Batched
rows with their own references, scales, seeds, prompts and init images each equal their solo
run; the trap of SD3's processor scale is a regression test; rows SD3.5 cannot run fail alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from helpers.requests import (
    assert_batched_rows_are_solo_runs,
    embedded,
    picture,
    read_rows,
    requests_for,
    with_catalog_fields,
)
from PIL import Image

from pipeline import diffusers_overrides
from pipeline.generator import Generator
from pipeline.manifest import Row
from pipeline.models import ModelSource
from pipeline.requests import build_request

pytestmark = pytest.mark.numerics  # equality with diffusers' own pipeline, number for number

CPU = torch.device("cpu")
F64 = torch.float64
SIZE = 32  # the tiny transformer's native size is 64 (32 latent pixels x 2)


@pytest.fixture(scope="module")
def sd35(tiny_models: Path) -> Generator:
    return Generator(ModelSource.parse(str(tiny_models)), ("sd35",), device=CPU, dtype=F64)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("mode", ["text", "img2img", "inpaint"])
def test_each_row_of_a_batch_is_its_solo_run(sd35: Generator, guidance: float, mode: str) -> None:
    """Three rows (1, 2 and 1 images) with their own references, scales (0.7, 0.3, 0.7),
    prompts and seeds in one call, with CFG and without; from noise, from init images,
    inpainting. Diffusers alone would tile the given embeds over the batch (a size error in
    SD3's projection) and take one scale for all."""
    rows = requests_for(sd35, num_images=[1, 2, 1], guidance=guidance)
    rows[1] = replace(rows[1], adapters=[replace(rows[1].adapters[0], scale=0.3)])
    holes = np.random.default_rng(2).random((SIZE, SIZE)) > 0.5
    mask = Image.fromarray((holes * 255).astype(np.uint8))
    rows = [
        replace(
            r,
            width=SIZE,
            height=SIZE,
            negative_prompt="blurry" if guidance > 1 else "",
            init_image=None if mode == "text" else picture(20 + i, (SIZE, SIZE)),
            strength=None if mode == "text" else 0.7,
            mask=mask if mode == "inpaint" else None,
        )
        for i, r in enumerate(rows)
    ]
    assert_batched_rows_are_solo_runs(sd35, with_catalog_fields(rows))


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_a_row_is_the_docs_pipeline(
    tiny_models: Path, sd35: Generator, clip_skip: int | None
) -> None:
    """The diffusers docs' SD3 IP-Adapter call, the picture encoded by the pipeline's own
    SigLIP; ipbatch: the embed stage's encoder, the cached tensors, the request."""
    reference = picture(5)
    tensors = embedded(tiny_models, "sd35", reference)
    row = Row.model_validate(
        {
            "id": "r",
            "adapter": "sd35",
            "reference": "ref.png",
            "scale": 0.8,
            "prompt": "a leather bag",
            "negative_prompt": "blurry",
            "num_images": 2,
            "seed": 4444,
            "steps": 3,
            "guidance_scale": 4.5,
            "clip_skip": clip_skip,
            "width": 64,  # a row's smallest
            "height": 64,
        }
    )
    mine = sd35.generate(build_request(row, [[tensors]])).arrays

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(tiny_models / "stable-diffusion-3.5-large"), torch_dtype=F64
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(tiny_models / "SD3.5-Large-IP-Adapter"),
        weight_name="ip-adapter.bin",
        image_encoder_folder=str(tiny_models / "siglip-so400m-patch14-384"),
    )
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe(
        width=64,
        height=64,
        prompt="a leather bag",
        negative_prompt="blurry",
        guidance_scale=4.5,
        clip_skip=clip_skip,
        num_inference_steps=3,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (4444, 4445)],
        ip_adapter_image=reference,
        output_type="np",
    ).images
    for a, b in zip(mine, theirs, strict=True):
        assert np.abs(a - b).max() < 1e-6


def test_per_row_scales_go_through_an_object_sd3_can_test(
    sd35: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD3's IP-Adapter processor tests `if self.scale != 0` before multiplying: a per-slot
    tensor there is ambiguous (RuntimeError). ipbatch hands it a scale object that is never 0
    and multiplies like the tensor."""
    rows = requests_for(sd35, num_images=[1, 1], guidance=4.0)
    rows = [replace(r, width=SIZE, height=SIZE) for r in rows]
    rows[1] = replace(rows[1], adapters=[replace(rows[1].adapters[0], scale=0.3)])
    assert len(sd35.generate_batch(rows)) == 2
    monkeypatch.setattr(diffusers_overrides, "_SlotScale", lambda tensor: tensor)
    with pytest.raises(RuntimeError, match="ambiguous"):
        sd35.generate_batch(rows)


def test_rows_sd35_cannot_run_fail_alone_with_the_reason() -> None:
    sd35 = {"id": "s", "adapter": "sd35", "reference": "r.png"}
    two = [{"adapter": "sd35", "reference": "r.png"}, {"adapter": "sd35", "reference": "q.png"}]
    parsed = read_rows(
        sd35,
        {"id": "a", "adapters": two},
        {"id": "b", "adapters": [two[0], {"adapter": "flux", "reference": "f.png"}]},
        {"id": "c", "adapters": [two[0], {"adapter": "sdxl-faceid", "reference": "f.png"}]},
        sd35 | {"id": "d", "reference": ["r.png", "q.png"], "combine": "concat"},
        sd35 | {"id": "e", "region": "m.png"},
        sd35 | {"id": "g", "scale": {"up": {"block_0": [1.0]}}},
        sd35 | {"id": "h", "true_cfg_scale": 2.0},
        sd35 | {"id": "i", "control": [{"model": "sdxl-canny", "image": "c.png"}]},
        sd35 | {"id": "j", "reference": ["r.png", "q.png"], "negative_prompt": "blurry"},
    )
    errors = [p.error or "" for p in parsed]
    assert parsed[0].row is not None and parsed[0].row.steps == 28
    assert parsed[0].row.guidance_scale == 3.5  # SD3.5 Large's card
    assert "takes one IP-Adapter" in errors[1]
    assert "share one base model" in errors[2] and "share one base model" in errors[3]
    assert "combine several references with 'average'" in errors[4]
    assert "takes no IP-Adapter masks" in errors[5]
    assert "InstantStyle blocks are for SD1.5 and SDXL" in errors[6]
    assert "true_cfg_scale is for FLUX.1 rows" in errors[7]
    assert "ControlNet" in errors[8]
    assert parsed[9].row is not None  # averaged references, a negative prompt: fine


def test_a_prompt_longer_than_t5_reads_is_said(sd35: Generator) -> None:
    """SD3.5 reads the whole prompt through T5, 256 tokens (`max_sequence_length`)."""
    [row] = requests_for(sd35, num_images=[1])
    assert sd35.prompt_warning(row) is None
    warning = sd35.prompt_warning(replace(row, prompt="a " * 300))
    assert warning is not None and "reads the first 256" in warning
