"""Train: one training job, from its manifest to the adapter `custom:<name>`.

1. claim the job (a lease with a fencing token, like ingest); a run that stopped half way
   resumes from its last checkpoint
2. read the training manifest: rows that fail validation, or whose images cannot be read,
   are skipped, counted and listed, never fatal
3. precompute every row's tensors: the reference's image embedding through the embed stage's
   cache (the very entries generation reads), the target's VAE latent mean/std and the
   prompt's text embedding, cached content-addressed the same way
4. train: a heartbeat with every logged step (renews the claim, records the loss; stops when
   the claim is lost or the job cancelled), a checkpoint every `checkpoint_every` steps to the
   object store (the newest `keep_checkpoints` kept), a validation every `validate_every`
5. export `adapter.safetensors` in h94's layout, validate it once more, write `card.json`
   (last: it marks the adapter complete), and the job succeeds
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import Action, ConfigError, ErrorCode, ItemError, ObjectNotFound, classify
from core.uris import join_uri
from pipeline.manifest_reader import ParsedRow, detect_format, read_rows
from pipeline.models import resolve_device
from pipeline.presets import ADAPTERS, BASE_MODELS, RepoPath, is_custom
from pipeline.sources import check_allowed, resolve_reference
from storage.embcache import CacheKey
from storage.ledger import jobs, training
from storage.models import JobStatus
from workers.context import StageContext
from workers.stages.common import decode, read_reference
from workers.stages.embed import embed_image, reference_key

if TYPE_CHECKING:
    import torch

    from pipeline.training import AdapterTrainer, Example, TrainingEncoders, TrainRow

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


@dataclass(frozen=True)
class _Run:
    job_id: str
    name: str
    token: str
    manifest_uri: str
    manifest_sha256: str
    output_uri: str
    settings: Any  # TrainSettings


class _Stop(Exception):
    """The claim was lost or the job cancelled: stop quietly, write nothing more."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def run(ctx: StageContext, *, job_id: str) -> TrainSummary:
    from pipeline.training import TrainSettings

    summary = TrainSummary(job_id=job_id)
    # 1. the claim
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        record = training.get(session, job_id=job_id)
        if job is None or record is None:
            raise KeyError(f"no training job {job_id}")
        token = training.claim(
            session,
            job_id=job_id,
            worker=ctx.worker,
            lease_seconds=ctx.settings.lease_seconds,
            now=ctx.clock(),
        )
        if token is None:  # ended (its result stands), or another worker holds it
            summary.status = str(job.status)
            summary.step, summary.adapter_uri = record.step, record.adapter_uri
            summary.examples, summary.skipped = record.examples or 0, record.skipped or []
            if job.status == JobStatus.RUNNING and job.lease_until is not None:
                summary.status = "held"
                summary.retry_in = max(0.0, (job.lease_until - ctx.clock()).total_seconds())
            return summary
        run_ = _Run(
            job_id,
            record.name,
            token,
            job.manifest_uri,
            job.manifest_sha256,
            job.output_uri,
            TrainSettings.model_validate(record.settings),
        )
    try:
        _train(ctx, run_, summary)
    except _Stop as stop:
        summary.status = stop.status
    except BaseException as exc:
        decision = classify(exc)
        with ctx.sessions.begin() as session:
            if decision.action is Action.FAIL:
                jobs.fail(
                    session,
                    job_id=job_id,
                    message=f"training failed: {decision.message}",
                    now=ctx.clock(),
                    worker=ctx.worker,
                )
                log.error("training job %s failed: %s", job_id, decision.message, exc_info=True)
                summary.status = "failed"
                return summary
            # an outage, a configuration error, a stop: given back, resumed by the next claim
            jobs.release_ingest(
                session,
                job_id=job_id,
                token=token,
                now=ctx.clock(),
                worker=ctx.worker,
                message=f"training given back: {decision.message}",
            )
        raise
    return summary


def _train(ctx: StageContext, run: _Run, summary: TrainSummary) -> None:
    from safetensors.torch import load as load_safetensors

    settings = run.settings
    # 2. + 3. the rows and their tensors
    encoders = _encoders(ctx, settings.kind)
    resolution = settings.resolution or BASE_MODELS[encoders.family].native_size
    data = _examples(ctx, run, encoders, resolution)
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
    rendering = _Rendering(data.rows[:count], examples[:count], data.references[:count], resolution)
    with ctx.sessions.begin() as session:
        newest = training.checkpoints(session, job_id=run.job_id)[:1]
    if newest:
        trainer.load_state(load_safetensors(ctx.stores.for_uri(newest[0].uri).get(newest[0].uri)))
        summary.resumed_from = trainer.step
        log.info("training job %s resumes at step %d", run.job_id, trainer.step)
    pending: list[tuple[int, float, float]] = []
    while trainer.step < settings.steps:
        result = trainer.train_step(examples)
        summary.step = result.step
        pending.append((result.step, result.loss, result.learning_rate))
        last = result.step == settings.steps
        if result.step % settings.log_every == 0 or last:  # one point: the window's mean
            mean = sum(loss for _, loss, _ in pending) / len(pending)
            _heartbeat(ctx, run, [(result.step, mean, result.learning_rate)])
            pending = []
        if result.step % settings.checkpoint_every == 0 and not last:
            _checkpoint(ctx, run, trainer)
        if settings.validate_every and result.step % settings.validate_every == 0 and not last:
            _validate(ctx, run, trainer, rendering)
    summary.step = trainer.step
    # 5. the adapter, its last validation, its card
    adapter = _exported(trainer)
    scores = _validate(ctx, run, trainer, rendering, adapter)
    summary.adapter_uri = _export(ctx, run, trainer, encoders, adapter, len(examples), scores)
    summary.status = "succeeded"


# --- 2. + 3. rows and tensors ----------------------------------------------------------------


@dataclass
class _Encoders:
    text: TrainingEncoders
    reference: Any  # ReferenceEncoder of the trained kind
    family: str


def _encoders(ctx: StageContext, kind: str) -> _Encoders:
    from pipeline.training import TrainingEncoders
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    family = ADAPTERS[kind].family
    text = TrainingEncoders(
        ctx.models.base_model(family),
        device=resolve_device(ctx.settings.device),
        local_files_only=ctx.models.local_files_only,
    )
    return _Encoders(text, ctx.encoder(kind), family)


def _read_rows(ctx: StageContext, uri: str) -> list[ParsedRow[TrainRow]]:
    from pipeline.training import TrainRow

    with ctx.stores.for_uri(uri).open(uri) as stream:
        return list(read_rows(stream, detect_format(uri), TrainRow.model_validate))


@dataclass
class _Data:
    """The valid rows, their tensors and their references as (sha256, URI); the skipped rows
    with the reason."""

    rows: list[TrainRow] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    references: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def _examples(ctx: StageContext, run: _Run, encoders: _Encoders, resolution: int) -> _Data:
    from pipeline.training import Example

    data = _Data()
    skipped = data.skipped
    cache_root = ctx.cache_root(run.output_uri)
    for parsed in _read_rows(ctx, run.manifest_uri):
        hashes: dict[str, tuple[str, bytes]] = {}  # this row's images, read once
        if parsed.row is None:
            skipped.append({"line": parsed.line_number, "id": parsed.row_id, "error": parsed.error})
            continue
        row = parsed.row
        try:
            image = _cached(
                ctx,
                run,
                row.reference_uri,
                hashes,
                cache_root,
                key_of=functools.partial(reference_key, encoders.reference),
                make=functools.partial(embed_image, ctx, encoders.reference),
            )
            latent = _cached(
                ctx,
                run,
                row.image,
                hashes,
                cache_root,
                key_of=lambda sha: CacheKey(
                    sha, encoders.text.vae_fingerprint, f"latent-{resolution}"
                ),
                make=lambda data, uri: encoders.text.latent(
                    decode(ctx, data, name=uri), resolution
                ),
            )
        except ItemError as exc:
            skipped.append({"line": parsed.line_number, "id": row.id, "error": str(exc)})
            continue
        text, _ = ctx.cache.fetch(
            key=CacheKey(
                hashlib.sha256(row.prompt.encode()).hexdigest(),
                encoders.text.text_fingerprint,
                "text",
            ),
            cache_root=cache_root,
            compute=functools.partial(_text, encoders.text, row.prompt),
        )
        data.rows.append(row)
        data.examples.append(
            Example(latent["mean"], latent["std"], text["text"], image["pos"], image["neg"])
        )
        reference = _resolved(ctx, run, row.reference_uri)
        data.references.append((hashes[reference][0], reference))
    return data


def _text(encoders: TrainingEncoders, prompt: str) -> dict[str, torch.Tensor]:
    return {"text": encoders.text(prompt)}


def _cached(
    ctx: StageContext,
    run: _Run,
    written: str,
    hashes: dict[str, tuple[str, bytes]],
    cache_root: str,
    *,
    key_of: Callable[[str], CacheKey],
    make: Callable[[bytes, str], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """An image's tensors: from the cache, or made from its bytes (read once per row)."""
    uri = _resolved(ctx, run, written)
    if uri not in hashes:
        data = read_reference(ctx, uri)
        hashes[uri] = (hashlib.sha256(data).hexdigest(), data)
    sha, data = hashes[uri]
    tensors, _ = ctx.cache.fetch(
        key=key_of(sha),
        cache_root=cache_root,
        compute=lambda: make(data, uri),
    )
    return tensors


# --- 4. the trainer, heartbeats, checkpoints, validation --------------------------------------


def _trainer(ctx: StageContext, settings: Any, encoders: _Encoders) -> AdapterTrainer:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from pipeline.adapter_weights import ProjectionShape
    from pipeline.models import loading
    from pipeline.training import AdapterTrainer

    preset = ADAPTERS[settings.kind]
    base = ctx.models.base_model(encoders.family)
    device = resolve_device(ctx.settings.device)
    # the frozen UNet in the autocast precision; the adapter is made fp32 (freeze_all_but_adapter)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        settings.mixed_precision
    ]
    local = ctx.models.local_files_only
    with loading(f"the base model at {base}", base):
        unet = UNet2DConditionModel.from_pretrained(
            base, subfolder="unet", dtype=dtype, local_files_only=local
        )
        scheduler = DDPMScheduler.from_pretrained(
            base, subfolder="scheduler", local_files_only=local
        )
    unet.to(device)
    init = init_weights(ctx, settings.init, settings.kind)
    if init is None:
        encoder = CLIPVisionConfig.from_pretrained(ctx.models.image_encoder(preset))
        shape = ProjectionShape.fresh(preset.projection, unet, encoder)
    else:
        shape = ProjectionShape.of_file(init)
    return AdapterTrainer(
        unet,
        scheduler,
        shape=shape,
        settings=settings,
        uncond_text=encoders.text.text(""),
        init_weights=init,
        vae_scaling_factor=encoders.text.scaling_factor,
    )


def init_weights(ctx: StageContext, init: str, kind: str) -> dict[str, torch.Tensor] | None:
    """Where training starts: None (`fresh`: the paper's init), or an h94-layout file: a
    published preset of the same architecture, an adapter trained here (`custom:NAME`), or a
    weight file (path or URI). ConfigError when it does not fit `kind`."""
    import torch
    from safetensors.torch import load as load_safetensors

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
    if uri.endswith(".bin"):  # h94's pickled files: tensors only, never code
        nested = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = {
            f"{part}.{k}": v
            for part in ("image_proj", "ip_adapter")
            for k, v in nested[part].items()
        }
    else:
        state = load_safetensors(data)
    return {k: v.float() for k, v in state.items()}


def _heartbeat(ctx: StageContext, run: _Run, log_rows: list[tuple[int, float, float]]) -> None:
    with ctx.sessions.begin() as session:
        status = training.progress(
            session,
            job_id=run.job_id,
            token=run.token,
            log=log_rows,
            lease_seconds=ctx.settings.lease_seconds,
            now=ctx.clock(),
        )
    if status is None:
        raise _Stop("lost")  # another worker holds the run now (our lease ran out)
    if status == JobStatus.CANCELLED:
        raise _Stop("cancelled")


def _checkpoint(ctx: StageContext, run: _Run, trainer: AdapterTrainer) -> None:
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
        raise _Stop("lost")
    for stale in old:
        ctx.stores.for_uri(stale).delete(stale)


@dataclass(frozen=True)
class _Rendering:
    """The validation set: the manifest's first rows, rendered with fixed seeds."""

    rows: list[TrainRow]
    examples: list[Example]
    references: list[tuple[str, str]]  # (sha256, URI)
    resolution: int
    scored: dict[str, torch.Tensor] = field(default_factory=dict)  # reference embeddings, memo


def _exported(trainer: AdapterTrainer) -> bytes:
    import torch
    from safetensors.torch import save

    from pipeline.adapter_weights import to_h94

    dtype = torch.float16 if trainer.settings.save_dtype == "fp16" else torch.float32
    return save(to_h94(trainer.unet, trainer.shape, dtype))


def _validate(
    ctx: StageContext,
    run: _Run,
    trainer: AdapterTrainer,
    rendering: _Rendering,
    data: bytes | None = None,
) -> dict[str, float | None]:
    """Export the adapter (unless `data` is that export already), load the file through the
    generation path, render the validation rows (image prompt only, scale 1.0, seed + row),
    score CLIP-I against each reference and CLIP-T against its prompt (the generate stage's
    scoring: the references' score embeddings are cached), record the means. {} with scoring
    off or no rows."""
    import statistics

    from pipeline.custom import WEIGHTS_FILE
    from pipeline.generator import Generator
    from pipeline.images import encode_output
    from pipeline.models import resolve_dtype
    from pipeline.requests import AdapterInput, GenerationRequest
    from workers.stages import scoring

    scorer = ctx.scorer
    if scorer is None or not rendering.rows:
        return {}
    settings = run.settings
    data = _exported(trainer) if data is None else data
    name = f"custom:{run.name}"
    samples: list[str] = []
    image_scores: list[float] = []
    text_scores: list[float] = []
    device = resolve_device(ctx.settings.device)
    with tempfile.TemporaryDirectory(prefix="ipbatch-validate-") as folder:
        (Path(folder) / WEIGHTS_FILE).write_bytes(data)
        preset = dataclasses.replace(
            ADAPTERS[settings.kind],
            name=name,
            weights=RepoPath("", folder, ""),
            weight_name=WEIGHTS_FILE,
            custom_sha256=hashlib.sha256(data).hexdigest(),
        )
        generator = Generator(
            ctx.models,
            (name,),
            device=device,
            dtype=resolve_dtype(ctx.settings.dtype, device),
            resolve=lambda _: preset,
        )
        for index, (row, example, reference) in enumerate(
            zip(rendering.rows, rendering.examples, rendering.references, strict=True)
        ):
            request = GenerationRequest(
                prompt="",
                negative_prompt="",
                adapters=[AdapterInput(name, 1.0, example.image, example.image_neg)],
                num_images=1,
                seed=settings.seed + index,
                steps=settings.validation_steps,
                guidance_scale=7.5,
                width=rendering.resolution,
                height=rendering.resolution,
            )
            [image] = generator.generate(request).images
            uri = join_uri(
                run.output_uri, "validation", f"step-{trainer.step:08d}", f"{row.id}.png"
            )
            metadata = {
                "job_id": run.job_id,
                "step": trainer.step,
                "row": row.id,
                "seed": request.seed,
            }
            png = encode_output(image, "png", metadata)
            ctx.stores.for_uri(uri).put(uri, png, content_type="image/png")
            samples.append(uri)
            references = scoring.reference_embeds(
                ctx,
                scorer,
                [reference],
                cache_root=ctx.cache_root(run.output_uri),
                memo=rendering.scored,
            )
            [(clip_i, clip_t)] = scoring.Judge(scorer, references, row.prompt)([image])
            image_scores.append(clip_i)
            if clip_t is not None:
                text_scores.append(clip_t)
        del generator
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
        raise _Stop("lost")
    log.info("training job %s step %d: CLIP-I %.4f", run.job_id, trainer.step, mean_i)
    return {"clip_i": mean_i, "clip_t": mean_t}


def _resolved(ctx: StageContext, run: _Run, written: str) -> str:
    uri = resolve_reference(written, manifest_uri=run.manifest_uri)
    check_allowed(uri, allowed=ctx.settings.allowed_sources, local_mode=ctx.local_mode)
    return uri


# --- 5. the adapter -------------------------------------------------------------------------


def _export(
    ctx: StageContext,
    run: _Run,
    trainer: AdapterTrainer,
    encoders: _Encoders,
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
        raise _Stop("lost")
    return adapter_uri


# --- registering a run ------------------------------------------------------------------------


def register(ctx: StageContext, *, manifest_uri: str, name: str, settings: Any) -> tuple[str, bool]:
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
