"""Catalog references in the diffusers call: weighted and combined embeddings, negative
references, the adapter's step window and named InstantStyle presets, each against what the
diffusers docs do (their callback, their CFG layout, their block dictionaries) or against torch
written out here, and batched rows equal to their solo runs (float64, tiny SD1.5)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.callbacks import IPAdapterScaleCutoffCallback
from helpers.requests import assert_batched_rows_are_solo_runs, requests_for

from pipeline.generator import Generator
from pipeline.manifest import Row
from pipeline.models import ModelSource
from pipeline.requests import GenerationRequest, build_request

F64 = torch.float64
STEPS = 5


@pytest.fixture(scope="module")
def sd15(tiny_models: Path) -> Generator:
    return Generator(
        ModelSource.parse(str(tiny_models)), ("sd15",), device=torch.device("cpu"), dtype=F64
    )


def docs_call(generator: Generator, row: GenerationRequest, **extra: object) -> np.ndarray:
    """The row as the diffusers docs call a pipeline with precomputed embeds: the negative
    half first under CFG, the scale set on the pipeline, one generator."""
    spec = row.adapters[0]
    generator.pipe.set_ip_adapter_scale(spec.scale)
    embeds = torch.stack([spec.neg, spec.pos]).to(F64)  # [2, refs, D]
    out = generator.pipe(
        prompt=row.prompt,
        ip_adapter_image_embeds=[embeds],
        num_inference_steps=row.steps,
        guidance_scale=row.guidance_scale,
        generator=torch.Generator().manual_seed(row.seed),
        output_type="np",
        **extra,
    )
    return np.asarray(out.images[0])


def with_adapter(row: GenerationRequest, **changes: object) -> GenerationRequest:
    return replace(row, adapters=[replace(row.adapters[0], **changes)], steps=STEPS)


def test_windows_and_negatives_per_row_batched_and_as_diffusers_does(sd15: Generator) -> None:
    """Three rows in one call: the adapter on the first 40% of the steps, from 40% on, and on
    every step with a negative reference's embedding as its negative; each its solo run. The
    first is diffusers' IPAdapterScaleCutoffCallback; the second a callback written here that
    turns the adapter on once i / n >= start; the third the docs' CFG layout with that
    negative; and each differs from the row without its field."""
    rows = requests_for(sd15, num_images=[1, 2, 1])
    negative = torch.randn(
        rows[2].adapters[0].pos.shape, generator=torch.Generator().manual_seed(5)
    )
    rows = [
        with_adapter(rows[0], window=(0.0, 0.4)),
        with_adapter(rows[1], window=(0.4, 1.0)),
        with_adapter(rows[2], neg=negative),
    ]
    solo = assert_batched_rows_are_solo_runs(sd15, rows)

    cutoff = docs_call(
        sd15, rows[0], callback_on_step_end=IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.4)
    )
    np.testing.assert_allclose(solo[0].arrays[0], cutoff, atol=1e-12)

    scale = rows[1].adapters[0].scale

    def starting(pipe, i, t, kwargs):  # type: ignore[no-untyped-def]
        if (i + 1) / pipe.num_timesteps >= 0.4:  # step i + 1 is in the window
            pipe.set_ip_adapter_scale(scale)
        return kwargs

    sd15.pipe.set_ip_adapter_scale(0.0)
    spec = rows[1].adapters[0]
    late = sd15.pipe(
        prompt=rows[1].prompt,
        ip_adapter_image_embeds=[torch.stack([spec.neg, spec.pos]).to(F64)],
        num_inference_steps=STEPS,
        guidance_scale=rows[1].guidance_scale,
        generator=torch.Generator().manual_seed(rows[1].seed),
        output_type="np",
        callback_on_step_end=starting,
    ).images[0]
    np.testing.assert_allclose(solo[1].arrays[0], late, atol=1e-12)

    np.testing.assert_allclose(solo[2].arrays[0], docs_call(sd15, rows[2]), atol=1e-12)
    for row, mine in zip(rows, solo, strict=True):
        plain = with_adapter(row, window=(0.0, 1.0), neg=torch.zeros_like(row.adapters[0].neg))
        assert np.abs(sd15.generate(plain).arrays[0] - mine.arrays[0]).max() > 1e-3


# the block dictionaries published by InstantStyle and the diffusers docs ("Style & layout
# control"), at strength 1
SDXL_STYLE = {"up": {"block_0": [0.0, 1.0, 0.0]}}
SDXL_LAYOUT = {"down": {"block_2": [0.0, 1.0]}}
SD15_STYLE = {"up": {"block_1": 1.0}}  # InstantStyle's infer_style_sd15.py: up_blocks.1
SD15_BOTH = {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}}


@pytest.mark.parametrize(
    ("adapter", "preset", "expected"),
    [
        ("sdxl", "style", SDXL_STYLE),
        ("sdxl", "layout", SDXL_LAYOUT),
        ("sdxl", "style_and_layout", SDXL_STYLE | SDXL_LAYOUT),
        ("sd15", "style", SD15_STYLE),
        ("sd15", "style_and_layout", SD15_BOTH),
    ],
)
def test_style_presets_are_the_published_dicts(adapter: str, preset: str, expected: dict) -> None:
    def times(value: object, k: float) -> object:
        if isinstance(value, dict):
            return {key: times(v, k) for key, v in value.items()}
        return [v * k for v in value] if isinstance(value, list) else float(value) * k  # type: ignore[arg-type]

    row = Row.model_validate(
        {
            "id": "r",
            "adapter": adapter,
            "reference": "a.png",
            "scale": {"preset": preset, "strength": 0.8},
        }
    )
    pos = torch.zeros(1, 4)
    request = build_request(row, [[{"pos": pos, "neg": pos}]])
    assert request.adapters[0].scale == times(expected, 0.8)


def test_a_preset_row_is_the_docs_call_and_batches(sd15: Generator) -> None:
    rows = requests_for(sd15, num_images=[1, 1, 1])
    rows = [with_adapter(r, scale=times_dict(SD15_BOTH, 0.8)) for r in rows]
    solo = assert_batched_rows_are_solo_runs(sd15, rows, own_adapters=False)
    np.testing.assert_allclose(solo[0].arrays[0], docs_call(sd15, rows[0]), atol=1e-12)


def times_dict(blocks: dict, k: float) -> dict:
    return {
        part: {b: v * k for b, v in value.items()} if isinstance(value, dict) else value * k
        for part, value in blocks.items()
    }


# --- weights, combines, tiles and negatives on cached embeddings ---------------------------------


def cached(seed: int, shape: tuple[int, ...] = (1, 4)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pos": torch.randn(shape, generator=g, dtype=F64), "neg": torch.zeros(shape, dtype=F64)}


@pytest.mark.parametrize("how", ["average", "norm_average", "subtract", "concat"])
def test_weighted_combines_are_the_formulas(how: str) -> None:
    refs = [cached(1), cached(2), cached(3)]
    w = [1.0, 0.5, 2.0]
    row = Row.model_validate(
        {"id": "r", "reference": ["a", "b", "c"], "combine": how, "weights": w}
    )
    got = build_request(row, [refs]).adapters[0]
    e = [r["pos"][0] for r in refs]
    if how == "average":
        expected = (e[0] * 1.0 + e[1] * 0.5 + e[2] * 2.0) / 3.5
    elif how == "norm_average":
        n = [x.norm() for x in e]
        unit = (e[0] / n[0] * 1.0 + e[1] / n[1] * 0.5 + e[2] / n[2] * 2.0) / 3.5
        expected = unit * (n[0] * 1.0 + n[1] * 0.5 + n[2] * 2.0) / 3.5
    elif how == "subtract":
        expected = e[0] * 1.0 - (e[1] * 0.5 + e[2] * 2.0) / 2
    else:
        expected = torch.stack([e[0] * 1.0, e[1] * 0.5, e[2] * 2.0])
    torch.testing.assert_close(got.pos, expected.reshape(got.pos.shape), atol=1e-12, rtol=0)
    assert torch.equal(got.neg, torch.zeros_like(got.pos))


def test_tiles_and_a_negative_reach_the_adapter_in_its_layout() -> None:
    """Tiles: their tokens one after another (SD1.5), their mean where the adapter takes one
    picture's features (SD3.5). A negative reference: its embedding (its tiles' mean) in
    place of the zero negative, one per token set."""
    tiles = cached(1, (3, 5, 8))  # a picture's three tiles
    negative = cached(2, (2, 5, 8))
    sd15 = Row.model_validate(
        {
            "id": "r",
            "adapter": "sd15-plus",
            "reference": "w",
            "fit": "tiles",
            "negative_reference": "n",
        }
    )
    got = build_request(sd15, [[tiles]], negatives=[negative]).adapters[0]
    assert torch.equal(got.pos, tiles["pos"])
    assert torch.equal(got.neg, negative["pos"].mean(dim=0, keepdim=True).expand(3, 5, 8))
    sd35 = Row.model_validate({"id": "r", "adapter": "sd35", "reference": "w", "fit": "tiles"})
    got = build_request(sd35, [[tiles]]).adapters[0]
    torch.testing.assert_close(got.pos, tiles["pos"].mean(dim=0, keepdim=True), atol=1e-12, rtol=0)
