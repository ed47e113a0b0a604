"""Scores of generated images: CLIP-I against the row's references, CLIP-T against its prompt
(the IP-Adapter paper's two metrics), and keeping the best of several tries when a score
threshold asks for more.

Plain data in, plain data out: images, references (their sha256 and URI), a prompt. The
references' score embeddings are content-addressed in the embedding cache like the adapters'
embeddings, so each reference is scored once, ever.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.embcache import CacheKey
from workers import metrics
from workers.stages.common import decode, read_reference

if TYPE_CHECKING:  # the scoring model's stack loads with the generate stage
    import torch
    from PIL import Image

    from pipeline.scores import ClipScorer
    from workers.context import StageContext

Score = tuple[float, float | None]  # (CLIP-I, CLIP-T; None without a prompt)


@dataclass
class Scored:
    """The images kept for a row, their seeds and scores, and every attempt made."""

    images: list[Image.Image]
    seeds: list[int]
    scores: list[Score]
    attempts: list[dict[str, Any]] = field(default_factory=list)  # output_attempts rows


class Judge:
    """Scores images against one row's references and prompt."""

    def __init__(self, scorer: ClipScorer, references: torch.Tensor, prompt: str) -> None:
        self.scorer = scorer
        self.references = references
        self.text = scorer.text_embeds([prompt])[0] if prompt else None

    def __call__(self, images: Sequence[Image.Image]) -> list[Score]:
        from pipeline.scores import clip_i, clip_t

        return [
            (clip_i(e, self.references), clip_t(e, self.text))
            for e in self.scorer.image_embeds(list(images))
        ]


def reference_embeds(
    ctx: StageContext,
    scorer: ClipScorer,
    references: Sequence[tuple[str, str]],
    *,
    cache_root: str,
    memo: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The scoring model's embeddings [r, d] of references given as (sha256, uri): from the
    cache under `cache_root` (kind `clip_score`), computed and cached on a miss. `memo` spares
    repeats in one batch."""
    import torch

    for sha, uri in references:
        if sha not in memo:
            tensors, hit = ctx.cache.fetch(
                key=CacheKey(sha, scorer.fingerprint, "clip_score"),
                cache_root=cache_root,
                compute=functools.partial(_embed_reference, ctx, scorer, uri),
            )
            metrics.CACHE.labels("hit" if hit else "miss").inc()
            memo[sha] = tensors["pos"]
    return torch.cat([memo[sha] for sha, _ in references])


def _embed_reference(ctx: StageContext, scorer: ClipScorer, uri: str) -> dict[str, torch.Tensor]:
    image = decode(ctx, read_reference(ctx, uri), name=uri)
    return {"pos": scorer.image_embeds([image])}


def keep_best(
    images: Sequence[Image.Image],
    seeds: Sequence[int],
    judge: Callable[[Sequence[Image.Image]], list[Score]],
    *,
    threshold: float | None,
    tries: int,
    again: Callable[[int, int], tuple[Image.Image, int]],
) -> Scored:
    """Score every image; with a `threshold`, an image whose CLIP-I is below it is made again
    (`again(k, attempt)` -> a new image and its seed) up to `tries` attempts in all, and the
    best one kept. Every attempt is recorded, the kept one marked."""
    scored = Scored(list(images), list(seeds), judge(images))
    scored.attempts = [
        {"image_index": k, "attempt": 0, "seed": seed, "clip_i": ci, "clip_t": ct, "kept": True}
        for k, (seed, (ci, ct)) in enumerate(zip(seeds, scored.scores, strict=True))
    ]
    if threshold is None:
        return scored
    for k in range(len(scored.images)):
        kept = scored.attempts[k]
        for attempt in range(1, tries):
            if scored.scores[k][0] >= threshold:
                break
            image, seed = again(k, attempt)
            [(ci, ct)] = judge([image])
            row = {"image_index": k, "attempt": attempt, "seed": seed, "clip_i": ci, "clip_t": ct}
            scored.attempts.append(row | {"kept": False})
            if ci > scored.scores[k][0]:  # better: this one is kept
                kept["kept"], scored.attempts[-1]["kept"], kept = False, True, scored.attempts[-1]
                scored.images[k], scored.seeds[k], scored.scores[k] = image, seed, (ci, ct)
    return scored
