"""The IP-Adapter paper's evaluation protocol (section 4.2), as generation rows.

For each (image, caption) pair: the image is the image prompt (no text prompt, adapter scale
1.0), N samples are drawn (the paper: 4) with the paper's sampler (DDIM, 50 steps, guidance
7.5; section 4.1.2), and every sample is scored with CLIP ViT-L/14:
CLIP-I, the cosine of its image embedding with the image prompt's, and CLIP-T, the CLIPScore
of it against the caption. Every adapter compared sees the same rows with the same seeds.
The paper's Table 1 row for IP-Adapter (COCO 2017 val, 5,000 pairs x 4): CLIP-T 0.588,
CLIP-I 0.828.

The rows are an ordinary generation manifest (the caption rides in `caption`, which CLIP-T
scores against), so an evaluation is batched, cached and resumable like any job. Its rows say
`regenerate: false`: a score threshold set on the workers would keep the best of several
images, and the table would score a selection instead of what the adapter makes.
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
    """The protocol's settings; the defaults are the paper's."""

    samples: int = 4
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "ddim"  # presets.SCHEDULERS
    scale: float = 1.0  # the image prompt alone, at full strength
    size: int | None = None  # width = height; None: the base model's native size

    @classmethod
    def of_row(cls, params: dict[str, Any]) -> EvalSettings:
        """The settings a generation row of `generation_rows` was made with (rows written
        before the sampler was a setting ran the model folder's own)."""
        return cls(
            samples=int(params["num_images"]),
            steps=int(params["steps"]),
            guidance_scale=float(params["guidance_scale"]),
            scheduler=str(params.get("scheduler", "default")),
            scale=float(params["scale"]),
            size=params.get("width"),
        )

    def check(self) -> None:
        """ValueError naming what a generation row could not take (steps 1..150, ...), so a
        bad setting is said once and not as a failure of every row."""
        from pydantic import ValidationError

        from pipeline.manifest import Row

        [row] = generation_rows([TrainRow(id="check", image="x.png")], ["sd15"], self, resolve=str)
        try:
            Row.model_validate(row)
        except ValidationError as exc:
            problems = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"the evaluation's settings: {problems}") from None

    def describe(self) -> str:
        size = f"{self.size}x{self.size}" if self.size else "native size"
        return (
            f"{self.scheduler} sampler, {self.steps} steps, guidance {self.guidance_scale:g}, "
            f"adapter scale {self.scale:g}, no text prompt, {self.samples} samples per pair, "
            f"{size}"
        )


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
                "scheduler": settings.scheduler,
                "regenerate": False,  # every image as made, whatever the score threshold
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


PAPER_SETTINGS = EvalSettings(size=512)  # section 4.1.2: DDIM, 50 steps, guidance 7.5


def table(scores: Sequence[AdapterScores], settings: EvalSettings | None = None) -> str:
    """The side-by-side table `ipbatch eval` prints, with the paper's row for reference and
    the settings of both."""

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
    if settings is not None:
        lines.append(f"settings: {settings.describe()}")
    lines.append(f"the paper: {PAPER_SETTINGS.describe()}")
    return "\n".join(lines)
