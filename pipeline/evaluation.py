"""The IP-Adapter paper's evaluation protocol (section 4.2), as generation rows.

For each (image, caption) pair: the image is the image prompt (no text prompt, adapter scale
1.0), N samples are drawn (the paper: 4), and every sample is scored with CLIP ViT-L/14:
CLIP-I, the cosine of its image embedding with the image prompt's, and CLIP-T, the CLIPScore
of it against the caption. Every adapter compared sees the same rows with the same seeds.
The paper's Table 1 row for IP-Adapter (COCO 2017 val, 5,000 pairs x 4): CLIP-T 0.588,
CLIP-I 0.828.

The rows are an ordinary generation manifest (the caption rides in `caption`, which CLIP-T
scores against), so an evaluation is batched, cached and resumable like any job.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.train_schema import TrainRow

PAPER_TABLE_1 = {"clip_i": 0.828, "clip_t": 0.588}  # IP-Adapter, SD1.5, COCO 2017 val


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 4
    steps: int = 30
    guidance_scale: float = 7.5
    scale: float = 1.0  # the image prompt alone, at full strength
    size: int | None = None  # width = height; None: the base model's native size


def row_id(row: str, adapter: str) -> str:
    return f"{row}.{adapter.replace(':', '-')}"


def row_seed(row: str) -> int:
    """The same seeds for every adapter compared: derived from the pair's id alone."""
    return int.from_bytes(hashlib.sha256(f"eval:{row}".encode()).digest()[:4], "big")


def generation_rows(
    rows: Sequence[TrainRow],
    adapters: Sequence[str],
    settings: EvalSettings,
    *,
    resolve: Callable[[str], str],
) -> list[dict[str, Any]]:
    """One generation row per (pair, adapter); `resolve` makes the image URIs absolute (the
    rows are written to a manifest of their own, in another folder)."""
    out = []
    for row in rows:
        for adapter in adapters:
            generated: dict[str, Any] = {
                "id": row_id(row.id, adapter),
                "reference": resolve(row.reference_uri),
                "adapter": adapter,
                "scale": settings.scale,
                "prompt": "",
                "caption": row.prompt,
                "num_images": settings.samples,
                "seed": row_seed(row.id),
                "steps": settings.steps,
                "guidance_scale": settings.guidance_scale,
            }
            if settings.size is not None:
                generated |= {"width": settings.size, "height": settings.size}
            out.append(generated)
    return out


@dataclass(frozen=True)
class AdapterScores:
    adapter: str
    images: int
    clip_i: float | None
    clip_i_std: float | None
    clip_t: float | None
    clip_t_std: float | None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    scored: Iterable[tuple[str, float | None, float | None]], adapters: Sequence[str]
) -> list[AdapterScores]:
    """(adapter, CLIP-I, CLIP-T) per output image -> mean and standard deviation per adapter,
    in the order the adapters were given."""
    by_adapter: dict[str, list[tuple[float | None, float | None]]] = {a: [] for a in adapters}
    for adapter, clip_i, clip_t in scored:
        by_adapter.setdefault(adapter, []).append((clip_i, clip_t))
    out = []
    for adapter, values in by_adapter.items():
        i_mean, i_std = _mean_std([i for i, _ in values if i is not None])
        t_mean, t_std = _mean_std([t for _, t in values if t is not None])
        out.append(AdapterScores(adapter, len(values), i_mean, i_std, t_mean, t_std))
    return out


def table(scores: Sequence[AdapterScores]) -> str:
    """The side-by-side table `ipbatch eval` prints, with the paper's row for reference."""

    def cell(mean: float | None, std: float | None) -> str:
        return "-" if mean is None else f"{mean:.4f} ± {std or 0.0:.4f}"

    width = max([len(s.adapter) for s in scores] + [len("IP-Adapter (paper)")])
    lines = [f"{'adapter':{width}}  {'images':>6}  {'CLIP-I':>17}  {'CLIP-T':>17}"]
    for s in scores:
        lines.append(
            f"{s.adapter:{width}}  {s.images:>6}  {cell(s.clip_i, s.clip_i_std):>17}  "
            f"{cell(s.clip_t, s.clip_t_std):>17}"
        )
    paper = PAPER_TABLE_1
    lines.append(
        f"{'IP-Adapter (paper)':{width}}  {'':>6}  {paper['clip_i']:>17.3f}  "
        f"{paper['clip_t']:>17.3f}   (COCO 2017 val, 5,000 x 4, real weights)"
    )
    return "\n".join(lines)
