"""Train, validation: the adapter's current export rendered and scored like an evaluation.

The manifest's first rows become the generation rows `ipbatch eval` would write for them (the
image prompt alone at scale 1.0, seeds from the pair's id) and go the generation path: rows ->
`build_request` -> `generate_batch`, batched like any job, on one warm pipeline kept for the
run (each validation loads the adapter's new weights into it). Each sample is stored and
scored with the generate stage's scoring; the means are recorded (fenced by the run's claim).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.uris import join_uri
from pipeline.models import resolve_device
from pipeline.presets import ADAPTERS, RepoPath
from pipeline.sources import resolve_reference
from pipeline.train_schema import TrainRow
from storage.ledger import training
from workers.context import StageContext
from workers.stages.train_data import TrainRun

if TYPE_CHECKING:
    import torch

    from pipeline.generator import Generator
    from pipeline.training import AdapterTrainer, Example

log = logging.getLogger(__name__)


@dataclass
class Rendering:
    """The validation set: the manifest's first rows, rendered as `ipbatch eval` renders a
    pair (the image prompt alone at scale 1.0, the seed derived from the pair's id) through
    the generation path, on one warm pipeline kept for the run (each validation loads the
    adapter's new weights into it)."""

    rows: list[TrainRow]
    examples: list[Example]
    references: list[tuple[str, str]]  # (sha256, URI)
    resolution: int
    scored: dict[str, torch.Tensor] = field(default_factory=dict)  # reference embeddings, memo
    generator: Generator | None = None


def exported(trainer: AdapterTrainer) -> bytes:
    import torch
    from safetensors.torch import save

    from pipeline.adapter_weights import to_h94

    dtype = torch.float16 if trainer.settings.save_dtype == "fp16" else torch.float32
    return save(to_h94(trainer.unet, trainer.shape, dtype))


def validate(
    ctx: StageContext,
    run: TrainRun,
    trainer: AdapterTrainer,
    rendering: Rendering,
    data: bytes | None = None,
) -> dict[str, float | None] | None:
    """Export the adapter (unless `data` is that export already), load the file into the
    validation pipeline, render the validation rows as generation rows (rows ->
    `build_request` -> `generate_batch`, batched like any job), score CLIP-I against each
    reference and CLIP-T against its caption (the generate stage's scoring: the references'
    score embeddings are cached), record the means. {} with scoring off or no rows; None
    when the run's claim was lost."""
    import statistics

    from pipeline.custom import WEIGHTS_FILE
    from pipeline.evaluation import EvalSettings, generation_rows
    from pipeline.generator import Generator
    from pipeline.images import encode_output
    from pipeline.manifest import validate_row
    from pipeline.models import resolve_dtype
    from pipeline.requests import build_request, image_metadata
    from workers.stages import scoring

    scorer = ctx.scorer
    if scorer is None or not rendering.rows:
        return {}
    settings = run.settings
    data = exported(trainer) if data is None else data
    name = f"custom:{run.name}"
    # 1. the adapter as this validation's weights, in the run's warm pipeline
    with tempfile.TemporaryDirectory(prefix="ipbatch-validate-") as folder:
        (Path(folder) / WEIGHTS_FILE).write_bytes(data)
        preset = dataclasses.replace(
            ADAPTERS[settings.kind],
            name=name,
            weights=RepoPath("", folder, ""),
            weight_name=WEIGHTS_FILE,
            custom_sha256=hashlib.sha256(data).hexdigest(),
        )
        if rendering.generator is None:
            device = resolve_device(ctx.settings.device)
            rendering.generator = Generator(
                ctx.models,
                (name,),
                device=device,
                dtype=resolve_dtype(ctx.settings.dtype, device),
                resolve=lambda _: preset,
            )
        else:
            rendering.generator.reload_adapters([preset])
    # 2. the rows `ipbatch eval` would write for these pairs, and their requests
    protocol = EvalSettings(samples=1, steps=settings.validation_steps, size=rendering.resolution)
    resolve = functools.partial(resolve_reference, manifest_uri=run.manifest_uri)
    rows = [
        validate_row(obj, lambda _: preset)
        for obj in generation_rows(rendering.rows, [name], protocol, resolve=resolve)
    ]
    requests = [
        build_request(row, [[{"pos": example.image, "neg": example.image_neg}]])
        for row, example in zip(rows, rendering.examples, strict=True)
    ]
    # 3. rendered in batched calls, stored, scored
    batch = ctx.batch_images
    results = [
        result
        for start in range(0, len(requests), batch)
        for result in rendering.generator.generate_batch(requests[start : start + batch])
    ]
    samples: list[str] = []
    image_scores: list[float] = []
    text_scores: list[float] = []
    for pair, row, result, reference in zip(
        rendering.rows, rows, results, rendering.references, strict=True
    ):
        [image] = result.images
        uri = join_uri(run.output_uri, "validation", f"step-{trainer.step:08d}", f"{pair.id}.png")
        metadata = {
            "job_id": run.job_id,
            "step": trainer.step,
            "row": pair.id,
            "seed": result.seeds[0],
            **image_metadata(row),
        }
        ctx.stores.for_uri(uri).put(
            uri, encode_output(image, "png", metadata), content_type="image/png"
        )
        samples.append(uri)
        references = scoring.reference_embeds(
            ctx,
            scorer,
            [reference],
            cache_root=ctx.cache_root(run.output_uri),
            memo=rendering.scored,
        )
        [(clip_i, clip_t)] = scoring.Judge(scorer, references, row.scored_text)([image])
        image_scores.append(clip_i)
        if clip_t is not None:
            text_scores.append(clip_t)
    mean_i = statistics.fmean(image_scores)
    mean_t = statistics.fmean(text_scores) if text_scores else None
    with ctx.sessions.begin() as session:
        recorded = training.add_validation(
            session,
            job_id=run.job_id,
            token=run.token,
            step=trainer.step,
            clip_i=mean_i,
            clip_t=mean_t,
            samples=samples,
            now=ctx.clock(),
        )
    if not recorded:
        return None  # the claim was lost: nothing more is written
    log.info("training job %s step %d: CLIP-I %.4f", run.job_id, trainer.step, mean_i)
    return {"clip_i": mean_i, "clip_t": mean_t}
