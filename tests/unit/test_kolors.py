"""Kolors with Kwai-Kolors' IP-Adapter-Plus (`kolors-plus`), on the tiny Kolors layout,
float64: ChatGLM3 as the text encoder, CLIP ViT-L/14-336's penultimate hidden states.

The reference side is diffusers' KolorsPipeline called as its docs show (the encoder loaded
from the adapter's `image_encoder` folder and passed to `from_pretrained`, `load_ip_adapter(...,
image_encoder_folder=None)`, `pipe(..., ip_adapter_image=picture)`); ipbatch's side is the
embed stage's encoder, the request mapping and the generator with no image encoder. Batched
rows each equal their solo run; rows Kolors cannot run fail alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import KolorsPipeline
from helpers.requests import (
    assert_batched_rows_are_solo_runs,
    embedded,
    picture,
    read_rows,
    requests_for,
)
from transformers import CLIPVisionModelWithProjection

from pipeline.generator import Generator
from pipeline.manifest import Row
from pipeline.models import ModelSource
from pipeline.requests import build_request

pytestmark = pytest.mark.numerics  # equality with diffusers' own pipeline, number for number

CPU = torch.device("cpu")
F64 = torch.float64


@pytest.fixture(scope="module")
def kolors(tiny_models: Path) -> Generator:
    return Generator(ModelSource.parse(str(tiny_models)), ("kolors-plus",), device=CPU, dtype=F64)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("mode", ["text", "img2img"])
def test_each_row_of_a_batch_is_its_solo_run(kolors: Generator, guidance: float, mode: str) -> None:
    """Three rows (1, 2 and 1 images) with their own references, scales (0.7, 0.3, 0.7),
    prompts and seeds in one call, with CFG and without, from noise and from init images."""
    rows = requests_for(kolors, num_images=[1, 2, 1], guidance=guidance)
    rows[1] = replace(rows[1], adapters=[replace(rows[1].adapters[0], scale=0.3)])
    rows = [
        replace(
            r,
            init_image=None if mode == "text" else picture(20 + i, (64, 64)),
            strength=None if mode == "text" else 0.7,
        )
        for i, r in enumerate(rows)
    ]
    assert_batched_rows_are_solo_runs(kolors, rows)


def test_a_row_is_the_docs_pipeline(tiny_models: Path, kolors: Generator) -> None:
    """The diffusers docs' Kolors IP-Adapter call; ipbatch: the embed stage's encoder, the
    cached tensors, the request."""
    reference = picture(5)
    tensors = embedded(tiny_models, "kolors-plus", reference)
    row = Row.model_validate(
        {
            "id": "r",
            "adapter": "kolors-plus",
            "reference": "ref.png",
            "scale": 0.8,
            "prompt": "a leather bag",
            "negative_prompt": "blurry",
            "num_images": 2,
            "seed": 4444,
            "steps": 3,
        }
    )
    mine = kolors.generate(build_request(row, [[tensors]])).arrays

    adapter = tiny_models / "Kolors-IP-Adapter-Plus"
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        adapter, subfolder="image_encoder", dtype=F64
    )
    pipe = KolorsPipeline.from_pretrained(
        str(tiny_models / "Kolors-diffusers"), image_encoder=image_encoder, torch_dtype=F64
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(adapter),
        subfolder="",
        weight_name="ip_adapter_plus_general.bin",
        image_encoder_folder=None,
    )
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe(
        prompt="a leather bag",
        negative_prompt="blurry",
        guidance_scale=5.0,  # the family's default, as the row got it
        num_inference_steps=3,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (4444, 4445)],
        ip_adapter_image=reference,
        output_type="np",
    ).images
    for a, b in zip(mine, theirs, strict=True):
        assert np.abs(a - b).max() < 1e-6


def test_rows_kolors_cannot_run_fail_alone_with_the_reason() -> None:
    kolors = {"id": "k", "adapter": "kolors-plus", "reference": "r.png"}
    parsed = read_rows(
        kolors,
        kolors | {"id": "a", "init_image": "i.png", "inpaint_mask": "m.png"},
        kolors | {"id": "b", "clip_skip": 1},
        kolors | {"id": "c", "scale": {"up": {"block_0": [1.0]}}},
        kolors | {"id": "d", "control": [{"model": "sdxl-canny", "image": "c.png"}]},
        {
            "id": "e",
            "adapters": [
                {"adapter": "kolors-plus", "reference": "r.png"},
                {"adapter": "sdxl", "reference": "s.png"},
            ],
        },
        kolors | {"id": "f", "init_image": "i.png", "region": "m.png"},
    )
    errors = [p.error or "" for p in parsed]
    assert parsed[0].row is not None
    assert (parsed[0].row.steps, parsed[0].row.guidance_scale) == (50, 5.0)  # the card's
    assert "inpaint_mask: kolors has no inpaint pipeline that takes IP-Adapters" in errors[1]
    assert "clip_skip is for SD1.5, SDXL and SD3.5 rows: KolorsPipeline takes none" in errors[2]
    assert "InstantStyle blocks are for SD1.5 and SDXL" in errors[3]
    assert "ControlNet" in errors[4]
    assert "share one base model" in errors[5]
    assert parsed[6].row is not None  # img2img with a region: Kolors' UNet takes IP masks


def test_a_prompt_longer_than_chatglm_reads_is_said(kolors: Generator) -> None:
    """Kolors reads the prompt through ChatGLM3, 256 tokens (`max_sequence_length`)."""
    [row] = requests_for(kolors, num_images=[1])
    assert kolors.prompt_warning(row) is None
    warning = kolors.prompt_warning(replace(row, prompt="a " * 300))
    assert warning is not None and "reads the first 256" in warning
