"""Generation requests with random reference embeddings, for the generator's tests."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.call_inputs import GenerationResult
from pipeline.generator import Generator
from pipeline.requests import AdapterInput, GenerationRequest


def sample(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A random embedding of the given trailing shape (-1: 65 tokens, the tiny encoders')."""
    return torch.randn(1, *[65 if d == -1 else d for d in shape], generator=g)


def requests_for(
    generator: Generator, *, num_images: list[int], negative: str = "", guidance: float = 7.5
) -> list[GenerationRequest]:
    """One request per row, each with its own random reference embeddings and prompt."""
    rows = []
    for i, k in enumerate(num_images):
        g = torch.Generator().manual_seed(100 + i)
        adapters = []
        for name, (shape, clip) in zip(
            generator.adapters, generator._projection_shapes, strict=True
        ):
            pos = sample(shape, g)
            clip_pos = sample(clip, g) if clip else None
            clip_neg = sample(clip, g) if clip else None
            adapters.append(AdapterInput(name, 0.7, pos, torch.zeros_like(pos), clip_pos, clip_neg))
        rows.append(
            GenerationRequest(
                prompt=f"product number {i}",
                negative_prompt=negative,
                adapters=adapters,
                num_images=k,
                seed=1000 * i + 7,
                steps=3,
                guidance_scale=guidance,
            )
        )
    return rows


def with_catalog_fields(rows: list[GenerationRequest]) -> list[GenerationRequest]:
    """Three rows, the first two given catalog fields that act per slot: the first's adapter
    acts on the first half of the steps, the second's from 40% on with a negative
    reference's embedding (random) in place of the zero negative."""
    first, second = rows[0].adapters[0], rows[1].adapters[0]
    negative = torch.randn(second.neg.shape, generator=torch.Generator().manual_seed(9))
    return [
        replace(rows[0], adapters=[replace(first, window=(0.0, 0.5))]),
        replace(rows[1], adapters=[replace(second, window=(0.4, 1.0), neg=negative)]),
        *rows[2:],
    ]


def picture(seed: int, size: tuple[int, int] = (90, 70)) -> Image.Image:
    """A random RGB picture (a reference, an init image, a control image)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def assert_batched_rows_are_solo_runs(
    generator: Generator, rows: list[GenerationRequest], *, own_adapters: bool = True
) -> list[GenerationResult]:
    """The rows in one call each equal their solo run (float64: to 1e-8); with
    `own_adapters`, the first and third rows really had their own references and scales (a
    row given another's reference, or another strength, makes another image). The solo
    results are returned."""
    batched = generator.generate_batch(rows)
    solo = [generator.generate(r) for r in rows]
    for row, b, s in zip(rows, batched, solo, strict=True):
        assert len(b.arrays) == row.num_images
        for mine, alone in zip(b.arrays, s.arrays, strict=True):
            assert np.abs(mine - alone).max() < 1e-8
    if own_adapters:
        swapped = replace(rows[2], adapters=rows[0].adapters)
        assert np.abs(generator.generate(swapped).arrays[0] - solo[2].arrays[0]).max() > 1e-3
        weaker = replace(rows[0], adapters=[replace(rows[0].adapters[0], scale=0.3)])
        assert np.abs(generator.generate(weaker).arrays[0] - solo[0].arrays[0]).max() > 1e-3
    return solo


def embedded(models_folder: Path, adapter: str, reference: Image.Image) -> dict[str, torch.Tensor]:
    """`reference` as the embed stage caches it for `adapter` (its encoder and processor,
    float64 on the CPU): the ipbatch side of the docs-call tests."""
    from pipeline.embedder import ClipEmbedder, ClipReferenceEncoder
    from pipeline.models import ModelSource
    from pipeline.presets import ADAPTERS

    models, preset = ModelSource.parse(str(models_folder)), ADAPTERS[adapter]
    encoder = ClipEmbedder(
        models.image_encoder(preset),
        models.feature_extractor(preset.family),
        device=torch.device("cpu"),
        dtype=torch.float64,
    )
    return ClipReferenceEncoder(encoder, preset.embed_kind, preset.family).encode(
        reference, name="reference"
    )


def read_rows(*objects: dict) -> list:
    """Manifest rows (dicts) through the manifest reader: each parsed row, or its error."""
    from pipeline.manifest_reader import read_manifest

    text = "".join(json.dumps(o) + "\n" for o in objects)
    return list(read_manifest(io.BytesIO(text.encode())))
