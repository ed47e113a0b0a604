"""Generation requests with random reference embeddings, for the generator's tests."""

from __future__ import annotations

import torch

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
