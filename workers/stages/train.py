"""Train: one training job, from its manifest to the adapter `custom:<name>`.

1. claim the job (a lease with a fencing token, like ingest); a run that stopped half way
   resumes from its last checkpoint
2. read the training manifest: rows that fail validation, or whose images cannot be read,
   are skipped, counted and listed, never fatal (`train_data`)
3. precompute every row's tensors: the reference's image embedding through the embed stage's
   cache (the very entries generation reads), the target's VAE latent mean/std and the
   prompt's text embedding, cached content-addressed the same way (`train_data`)
4. train: a heartbeat with every logged step (renews the claim, records the loss; stops when
   the claim is lost or the job cancelled), a checkpoint every `checkpoint_every` steps to the
   object store (the newest `keep_checkpoints` kept), a validation every `validate_every`
   (`train_validation`: rendered through the generation path, as `ipbatch eval` renders)
5. export `adapter.safetensors` in h94's layout, validate it once more, write `card.json`
   (last: it marks the adapter complete), and the job succeeds
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, ErrorCode, ItemError, ObjectNotFound
from core.uris import join_uri
from pipeline.families import BASE_MODELS
from pipeline.models import resolve_device
from pipeline.presets import ADAPTERS, is_custom
from pipeline.train_schema import TrainSettings
from storage.ledger import jobs, training
from storage.lifecycle import TRAIN
from storage.models import JobStatus
from workers.claims import JobClaim, StopJob, claimed_job
from workers.context import StageContext
from workers.stages.train_data import Encoders, TrainRun, load_encoders, read_examples
from workers.stages.train_validation import Rendering, exported, validate

if TYPE_CHECKING:
    import torch

    from pipeline.training import AdapterTrainer, StepResult

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    job_id: str = ""
    status: str = ""  # how the run ended: succeeded, failed, cancelled, held, lost, released
    step: int = 0
    resumed_from: int | None = None  # the checkpoint's step
    examples: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    retry_in: float = 0.0  # held: seconds until the other worker's lease runs out
    adapter_uri: str | None = None
    skipped_steps: int = 0  # fp16: optimizer steps skipped for overflowing gradients


def run(ctx: StageContext, *, job_id: str) -> TrainSummary:
    summary = TrainSummary(job_id=job_id)
    # 1. the claim (`claimed_job`: a lost claim or a cancel ends the run quietly, a failure
    #    fails the job, an outage or a configuration error gives it back to be resumed)
    with claimed_job(ctx, TRAIN, job_id) as claim:
        if claim is None:  # ended (its result stands), or another worker holds it
            _as_it_stands(ctx, job_id, summary)
            return summary
        _train(ctx, _claimed_run(ctx, claim), summary)
    if claim.stopped is not None:
        summary.status = claim.stopped
    elif claim.failed is not None:
        summary.status = "failed"
    return summary


def _claimed_run(ctx: StageContext, claim: JobClaim) -> TrainRun:
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=claim.job_id)
        record = training.get(session, job_id=claim.job_id)
        assert job is not None and record is not None, "a claimed training job has its run"
        return TrainRun(
            claim.job_id,
            record.name,
            claim.token,
            job.manifest_uri,
            job.manifest_sha256,
            job.output_uri,
            TrainSettings.model_validate(record.settings),
        )


def _as_it_stands(ctx: StageContext, job_id: str, summary: TrainSummary) -> None:
    """A run this worker did not claim: how it stands (held: when the holder's lease ends)."""
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        record = training.get(session, job_id=job_id)
        if job is None or record is None:
            raise KeyError(f"no training job {job_id}")
        summary.status = str(job.status)
        summary.step, summary.adapter_uri = record.step, record.adapter_uri
        summary.skipped_steps = record.skipped_steps or 0
        summary.examples, summary.skipped = record.examples or 0, record.skipped or []
        if job.status == JobStatus.RUNNING and job.lease_until is not None:
            summary.status = "held"
            summary.retry_in = max(0.0, (job.lease_until - ctx.clock()).total_seconds())


def _train(ctx: StageContext, run: TrainRun, summary: TrainSummary) -> None:
    from safetensors.torch import load as load_safetensors

    settings = run.settings
    # 2. + 3. the rows and their tensors
    encoders = load_encoders(ctx, settings.kind)
    resolution = settings.resolution or BASE_MODELS[encoders.family].native_size
    data = read_examples(ctx, run, encoders, resolution)
    examples = data.examples
    summary.examples, summary.skipped = len(examples), data.skipped
    with ctx.sessions.begin() as session:
        training.set_data(
            session,
            job_id=run.job_id,
            examples=len(examples),
            skipped=data.skipped,
            now=ctx.clock(),
        )
    if not examples:
        raise ItemError(ErrorCode.INVALID_ROW, f"no usable rows in {run.manifest_uri}")
    # 4. the trainer, resumed from the newest checkpoint if there is one
    trainer = _trainer(ctx, settings, encoders)
    count = settings.validation_rows
    rendering = Rendering(data.rows[:count], examples[:count], data.references[:count], resolution)
    with ctx.sessions.begin() as session:
        newest = training.checkpoints(session, job_id=run.job_id)[:1]
    if newest:
        trainer.load_state(load_safetensors(ctx.stores.for_uri(newest[0].uri).get(newest[0].uri)))
        summary.resumed_from = trainer.step
        log.info("training job %s resumes at step %d", run.job_id, trainer.step)
    pending: list[StepResult] = []
    while trainer.step < settings.steps:
        result = trainer.train_step(examples)
        summary.step = result.step
        pending.append(result)
        last = result.step == settings.steps
        if result.step % settings.log_every == 0 or last:  # one point: the window's mean
            mean = sum(r.loss for r in pending) / len(pending)
            skipped = sum(r.skipped for r in pending)  # fp16 overflows in the window
            point = (result.step, mean, result.learning_rate, skipped)
            _heartbeat(ctx, run, [point], trainer.skipped_steps)
            pending = []
        if result.step % settings.checkpoint_every == 0 and not last:
            _checkpoint(ctx, run, trainer)
        if settings.validate_every and result.step % settings.validate_every == 0 and not last:
            if validate(ctx, run, trainer, rendering) is None:
                raise StopJob("lost")
    summary.step = trainer.step
    summary.skipped_steps = trainer.skipped_steps
    # 5. the adapter, its last validation, its card
    adapter = exported(trainer)
    scores = validate(ctx, run, trainer, rendering, adapter)
    if scores is None:
        raise StopJob("lost")
    rendering.generator = None  # its memory back before the export
    summary.adapter_uri = _export(ctx, run, trainer, encoders, adapter, len(examples), scores)
    summary.status = "succeeded"


def _trainer(ctx: StageContext, settings: TrainSettings, encoders: Encoders) -> AdapterTrainer:
    from pipeline.training import load_trainer

    preset = ADAPTERS[settings.kind]
    return load_trainer(
        ctx.models.base_model(encoders.family),
        image_encoder_folder=ctx.models.image_encoder(preset),
        projection=preset.projection,
        settings=settings,
        encoders=encoders.text,
        init=init_weights(ctx, settings.init, settings.kind),
        device=resolve_device(ctx.settings.device),
        local_files_only=ctx.models.local_files_only,
    )


def init_weights(ctx: StageContext, init: str, kind: str) -> dict[str, torch.Tensor] | None:
    """Where training starts: None (`fresh`: the paper's init), or an h94-layout file: a
    published preset of the same architecture, an adapter trained here (`custom:NAME`), or a
    weight file (path or URI). ConfigError when it does not fit `kind`."""
    from pipeline.adapter_weights import read_h94_file

    if init == "fresh":
        return None
    target = ADAPTERS[kind]
    if init in ADAPTERS or is_custom(init):
        try:
            preset = ctx.adapters(init)
        except KeyError as exc:
            raise ConfigError(f"--init {init}: {exc.args[0]}") from None
        if (preset.projection, preset.image_encoder) != (target.projection, target.image_encoder):
            raise ConfigError(
                f"--init {init} is a {preset.projection} adapter on {preset.image_encoder}; "
                f"{kind} needs a {target.projection} one on {target.image_encoder}"
            )
        folder, sub, name = ctx.models.adapter_weights(preset)
        uri = str(Path(folder) / sub / name)
    else:
        uri = init
    try:
        data = ctx.stores.for_uri(uri).get(uri)
    except ObjectNotFound as exc:
        raise ConfigError(f"--init {init}: no such file {uri}") from exc
    return read_h94_file(data, uri)


def _heartbeat(
    ctx: StageContext,
    run: TrainRun,
    log_rows: list[tuple[int, float, float, int]],
    skipped_steps: int,
) -> None:
    with ctx.sessions.begin() as session:
        status = training.progress(
            session,
            job_id=run.job_id,
            token=run.token,
            log=log_rows,
            skipped_steps=skipped_steps,
            lease_seconds=ctx.settings.lease_seconds,
            now=ctx.clock(),
        )
    if status is None:
        raise StopJob("lost")  # another worker holds the run now (our lease ran out)
    if status == JobStatus.CANCELLED:
        raise StopJob("cancelled")


def _checkpoint(ctx: StageContext, run: TrainRun, trainer: AdapterTrainer) -> None:
    """The adapter, AdamW's state, the generator and the step (never the whole UNet)."""
    from safetensors.torch import save

    uri = join_uri(run.output_uri, "checkpoints", f"step-{trainer.step:08d}.safetensors")
    store = ctx.stores.for_uri(uri)
    store.put(uri, save(trainer.state(), metadata={"job_id": run.job_id}))
    with ctx.sessions.begin() as session:
        old = training.add_checkpoint(
            session,
            job_id=run.job_id,
            token=run.token,
            step=trainer.step,
            uri=uri,
            keep=run.settings.keep_checkpoints,
            now=ctx.clock(),
        )
    if old is None:
        raise StopJob("lost")
    for stale in old:
        ctx.stores.for_uri(stale).delete(stale)


# --- 5. the adapter -------------------------------------------------------------------------


def _export(
    ctx: StageContext,
    run: TrainRun,
    trainer: AdapterTrainer,
    encoders: Encoders,
    data: bytes,
    examples: int,
    scores: dict[str, float | None],
) -> str:
    """adapter.safetensors (`data`), then card.json (its presence marks the adapter
    complete), then the ledger: succeeded (fenced: a worker that lost its claim records
    nothing; what it wrote is what the new holder writes too, the run being deterministic)."""
    from pipeline.custom import CARD_FILE, WEIGHTS_FILE, AdapterCard
    from pipeline.models import folder_fingerprint

    adapter_uri = join_uri(run.output_uri, WEIGHTS_FILE)
    ctx.stores.for_uri(adapter_uri).put(adapter_uri, data)
    base = Path(ctx.models.base_model(encoders.family)) / "unet"
    card = AdapterCard(
        name=run.name,
        kind=run.settings.kind,
        family=encoders.family,
        base_model="unet-" + folder_fingerprint(base, ("*.json", "*.safetensors", "*.bin"))[:16],
        image_encoder=encoders.reference.fingerprint,
        tokens=trainer.shape.tokens,
        weights_sha256=hashlib.sha256(data).hexdigest(),
        dtype=run.settings.save_dtype,
        init=run.settings.init,
        settings=run.settings.model_dump(mode="json"),
        manifest_uri=run.manifest_uri,
        manifest_sha256=run.manifest_sha256,
        examples=examples,
        steps=trainer.step,
        scores=scores,
        trainable_parameters=trainer.trainable_count,
        created_at=ctx.clock().astimezone(UTC).isoformat(),
    )
    card_uri = join_uri(run.output_uri, CARD_FILE)
    ctx.stores.for_uri(card_uri).put(
        card_uri, card.model_dump_json(indent=2).encode(), content_type="application/json"
    )
    with ctx.sessions.begin() as session:
        finished = training.finish(
            session,
            job_id=run.job_id,
            token=run.token,
            adapter_uri=adapter_uri,
            card=card.model_dump(mode="json"),
            now=ctx.clock(),
            worker=ctx.worker,
        )
    if not finished:
        raise StopJob("lost")
    return adapter_uri


# --- registering a run ------------------------------------------------------------------------


def register(
    ctx: StageContext, *, manifest_uri: str, name: str, settings: TrainSettings
) -> tuple[str, bool]:
    """A training job for `custom:<name>`; the same name, manifest and settings again give
    the same job (it resumes). ConfigError for a taken name or an `--init` that does not fit."""
    from pipeline.custom import CARD_FILE
    from pipeline.manifest import ROW_ID_PATTERN
    from workers.stages.jobs import manifest_sha256

    if not re.fullmatch(ROW_ID_PATTERN, name):
        raise ConfigError(f"--name {name!r}: letters, digits, '.', '_' and '-' (up to 128)")
    init_weights(ctx, settings.init, settings.kind)  # fails now, not on a GPU worker later
    output_uri = ctx.adapters.location(name)
    sha = manifest_sha256(ctx, manifest_uri)
    with ctx.sessions.begin() as session:
        known = training.by_name(session, name=name) is not None
    card = join_uri(output_uri, CARD_FILE)
    if not known and ctx.stores.for_uri(card).exists(card):
        raise ConfigError(f"an adapter named {name!r} already exists at {output_uri}")
    try:
        with ctx.sessions.begin() as session:
            return training.register(
                session,
                name=name,
                manifest_uri=manifest_uri,
                manifest_sha256=sha,
                output_uri=output_uri,
                settings=settings.model_dump(mode="json"),
                total_steps=settings.steps,
                now=ctx.clock(),
                worker=ctx.worker,
            )
    except training.NameTaken as exc:
        raise ConfigError(str(exc)) from exc


def requeue(ctx: StageContext, *, job_id: str, send_train: Callable[[str], None]) -> None:
    """`ipbatch retry` of a training job on the workers: a failed run back to running with
    nobody holding it, and its message sent again (a stranded run's too); the next claim
    resumes from the last checkpoint."""
    with ctx.sessions.begin() as session:
        training.retry(session, job_id=job_id, now=ctx.clock(), worker=ctx.worker)
    send_train(job_id)
