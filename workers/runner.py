"""`ipbatch run`: the whole job on one machine, no servers (SQLite + a local folder).

The same stage functions as the Celery workers, called in-process, one stage after the other
as the stage table lists them: register, ingest, then embed and generate. The error policy is
the workers' too: an outage (S3 outputs, say) is waited out with backoff, a configuration
error stops the run (exit 2) with every item given back. Running it again resumes: the same
manifest gives the same job, items an interrupted run left half-done are released, and
finished items are not redone.
"""

from __future__ import annotations

import fcntl
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.config import Settings
from core.uris import absolute_uri
from pipeline.requests import adapter_set
from pipeline.train_schema import TrainSettings
from storage.ledger import counters, items, job_claims, jobs, queries, training
from storage.ledger.jobs import JobOptions
from storage.lifecycle import GENERATE, INGEST, STAGES, TRAIN, Stage
from storage.migrate import upgrade
from storage.models import ItemStatus, JobKind, JobStatus
from workers.backpressure import patiently
from workers.context import StageContext
from workers.stages import jobs as job_stage
from workers.stages import results, verify
from workers.stages import train as train_stage
from workers.stages.common import chunked, no_send
from workers.stages.runs import RUNS

MAX_FAILURES_SHOWN = 20


@dataclass
class RunSummary:
    job_id: str
    status: str
    counts: dict[str, int]
    images: int
    seconds: float
    database: str
    output_uri: str
    failures: list[tuple[str | None, str | None, str | None]]
    verified: verify.Verified | None = None  # `ipbatch run --verify`
    error: str | None = None  # why the job as a whole failed (its manifest, stopped early)
    reused: int = 0  # of the job's images: made before (another job) and copied


@contextmanager
def single_runner(home: Path) -> Iterator[None]:
    """Only one `ipbatch run` per IPBATCH_HOME: it may release the items it finds in flight."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / "run.lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SystemExit(f"another `ipbatch run` is using {home}") from exc
        yield


@contextmanager
def local_context(settings: Settings) -> Iterator[StageContext]:
    """The runner's lock, the ledger migrated, and a context for this machine."""
    with single_runner(settings.resolved_home()):
        upgrade(settings.ledger_url())
        ctx = StageContext.create(settings, mode="local")
        try:
            yield ctx
        finally:
            ctx.close()


def run_local(
    settings: Settings,
    *,
    manifest: str,
    output: str | None,
    progress: bool = True,
    check: bool = False,
    options: JobOptions = JobOptions(),
) -> RunSummary:
    """`ipbatch run`; with `check` (`--verify`), every recorded output read back at the end
    (sha256 and decoding: `verify --deep`)."""
    started = time.monotonic()
    with local_context(settings) as ctx:
        summary = run_job(
            ctx,
            manifest=manifest,
            output=output or str(settings.resolved_home() / "outputs"),
            progress=progress,
            started=started,
            options=options,
        )
        if check:
            summary.verified = verify.verify(ctx, job_id=summary.job_id, deep=True)
        return summary


def verify_local(
    settings: Settings,
    *,
    job_id: str,
    deep: bool,
    repair: bool,
    threads: int = 32,
    progress: bool = True,
) -> tuple[verify.Verified, RunSummary | None, verify.Verified | None]:
    """`ipbatch verify JOB` in one-machine mode: the check; with `repair`, the items of its
    problems made again here and now, then the check once more. Returns (the first check,
    the repair run's summary, the second check)."""
    started = time.monotonic()
    with local_context(settings) as ctx:
        found = verify.verify(ctx, job_id=job_id, deep=deep, threads=threads)
        if not (repair and found.problems):
            return found, None, None
        verify.repair(ctx, verified=found, send=no_send)
        images = _run_stages(ctx, job_id, progress)
        summary = _summary(ctx, job_id, images=images, started=started)
        return found, summary, verify.verify(ctx, job_id=job_id, deep=deep, threads=threads)


def run_job(
    ctx: StageContext,
    *,
    manifest: str,
    output: str,
    progress: bool,
    started: float,
    options: JobOptions = JobOptions(),
) -> RunSummary:
    """Register (or resume), ingest, embed and generate one job with `ctx`, in-process.
    `run_local` wraps it; benchmarks call it with a context whose models are already warm."""
    # 1. the job: the same manifest and output give the same job, resumed
    manifest_uri = absolute_uri(manifest)
    output_uri = absolute_uri(output)
    job_id, created = job_stage.register(
        ctx,
        manifest_uri=manifest_uri,
        output_uri=output_uri,
        options=replace(options, webhook_url=job_stage.webhook_for(ctx, options.webhook_url)),
    )
    if not created:
        _release_in_flight(ctx, job_id)
    # 2. ingest, 3. every stage in turn
    _patiently(ctx, functools.partial(RUNS[INGEST.name], ctx, job_id=job_id, send=no_send))
    images = _run_stages(ctx, job_id, progress)
    return _summary(ctx, job_id, images=images, started=started)


def retry_local(settings: Settings, *, job_id: str, progress: bool = True) -> RunSummary:
    """`ipbatch retry JOB` in one-machine mode: failed items back to pending, then run them."""
    started = time.monotonic()
    with local_context(settings) as ctx:
        _release_in_flight(ctx, job_id)
        job_stage.retry(ctx, job_id=job_id, send=no_send)
        images = _run_stages(ctx, job_id, progress)
        return _summary(ctx, job_id, images=images, started=started)


def rerun_local(
    settings: Settings, *, job_id: str, name: str | None = None, progress: bool = True
) -> RunSummary:
    """`ipbatch rerun JOB` in one-machine mode: a new run of the ended job, run here."""
    started = time.monotonic()
    with local_context(settings) as ctx:
        again = job_stage.rerun(ctx, job_id=job_id, send_ingest=lambda _: None, name=name)
        _patiently(ctx, functools.partial(RUNS[INGEST.name], ctx, job_id=again, send=no_send))
        images = _run_stages(ctx, again, progress)
        return _summary(ctx, again, images=images, started=started)


def _patiently(ctx: StageContext, work: Callable[[], Any]) -> Any:
    return patiently(
        work,
        probe=ctx.probe,
        patience=ctx.settings.outage_patience,
        backoff_max=ctx.settings.backoff_max,
    )


def _run_stages(ctx: StageContext, job_id: str, progress: bool) -> int:
    """Every stage in turn over the items waiting for it; again while a later stage sent
    items back to an earlier one (a cached embedding gone). Returns the images made."""
    images = 0
    for _ in range(3):
        for stage in STAGES:
            images += _run_stage(ctx, stage, job_id, progress)
        with ctx.sessions.begin() as session:
            counts = counters.item_counts(session, job_id=job_id)
        if not any(counts.get(stage.waiting) for stage in STAGES):
            break
    return images


def _run_stage(ctx: StageContext, stage: Stage, job_id: str, progress: bool) -> int:
    with ctx.sessions.begin() as session:
        waiting = _waiting(session, job_id, stage)
    # bigger calls than the queue's messages for generation: more rows to batch, more overlap
    size = ctx.settings.generate_batch
    if stage == GENERATE:
        size = max(size, 8 * ctx.batch_images)
    bar = tqdm(total=len(waiting), desc=stage.name, unit="item", disable=not progress)
    images = 0
    for ids in chunked(waiting, size):
        summary = _patiently(ctx, functools.partial(RUNS[stage.name], ctx, item_ids=ids))
        images += summary.images
        bar.update(len(ids))
    bar.close()
    return images


def _waiting(session: Any, job_id: str, stage: Stage) -> list[int]:
    """The job's items waiting for `stage`; for generation grouped by adapter set, so each
    warm pipeline is built once."""
    ids = items.all_ids(session, job_id=job_id, status=stage.waiting)
    if stage != GENERATE:
        return ids
    keyed = []
    for page in chunked(ids, 1000):
        keyed += [(adapter_set(i.params), i.id) for i in items.load_items(session, item_ids=page)]
    return [item_id for _, item_id in sorted(keyed)]


def _summary(ctx: StageContext, job_id: str, *, images: int, started: float) -> RunSummary:
    with ctx.sessions.begin() as session:
        jobs.finalize(session, job_id=job_id, now=ctx.clock(), worker=ctx.worker)
    results.after_end(ctx, [job_id])  # results.jsonl, the webhook
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        assert job is not None
        counts = {str(k): v for k, v in counters.item_counts(session, job_id=job_id).items()}
        failures = [
            (i.row_id, i.error_code, i.error_message) for i in _failed_items(session, job_id)
        ]
        return RunSummary(
            job_id=job_id,
            status=str(job.status),
            counts=counts,
            images=images,
            seconds=time.monotonic() - started,
            database=ctx.settings.ledger_url(),
            output_uri=f"{job.output_uri}/{job_id}",
            failures=failures,
            error=job.error_message,
            reused=queries.images(session, job_id=job_id)["reused"],
        )


def _failed_items(session: Any, job_id: str) -> list[Any]:
    return queries.items_in_status(
        session, job_id=job_id, statuses=[ItemStatus.FAILED], limit=MAX_FAILURES_SHOWN
    )


def _release_in_flight(ctx: StageContext, job_id: str) -> None:
    """What a killed run left claimed goes back to waiting: its items, and the job's ingest
    (this runner holds the only lock on the ledger, so nobody else holds them)."""
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        if job is None or job.status in (JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED):
            return
        message = "released: the previous run was interrupted"
        items.release_all_held(
            session, job_id=job_id, worker=ctx.worker, message=message, now=ctx.clock()
        )
        # its ingest's claim, or its training run's
        job_claims.end_any(
            session, job_id=job_id, now=ctx.clock(), worker=ctx.worker, message=message
        )


def job_kind_local(settings: Settings, *, job_id: str) -> JobKind | None:
    """In one-machine mode: what kind of job `job_id` is (None: no such job)."""
    with local_context(settings) as ctx:
        found = job_stage.describe(ctx, job_id=job_id)
    return None if found is None else found[0]


def retry_training_local(settings: Settings, *, job_id: str) -> train_stage.TrainSummary:
    """`ipbatch retry` of a training job on one machine: resumed here from its checkpoint."""
    with local_context(settings) as ctx:
        return _train_here(ctx, job_id, again=True)


def train_local(
    settings: Settings, *, manifest: str, name: str, train_settings: TrainSettings
) -> train_stage.TrainSummary:
    """`ipbatch train` on one machine: register the run (or find it again: the same name,
    manifest and settings resume where an interrupted run's last checkpoint left it) and
    train here, in-process."""
    with local_context(settings) as ctx:
        manifest_uri = absolute_uri(manifest)
        job_id, created = train_stage.register(
            ctx, manifest_uri=manifest_uri, name=name, settings=train_settings
        )
        return _train_here(ctx, job_id, again=not created)


def _train_here(ctx: StageContext, job_id: str, *, again: bool) -> train_stage.TrainSummary:
    """Run the training job in this process; `again`: a job seen before, whose interrupted
    claim is released (this runner holds the only lock) and which, if it failed, is retried."""
    if again:
        _release_in_flight(ctx, job_id)
        with ctx.sessions.begin() as session:
            training.retry(session, job_id=job_id, now=ctx.clock(), worker=ctx.worker)
    summary: train_stage.TrainSummary = _patiently(
        ctx, functools.partial(RUNS[TRAIN.name], ctx, job_id=job_id)
    )
    return summary


def eval_local(
    settings: Settings,
    *,
    manifest: str,
    adapters: list[str],
    eval_settings: Any,
    output: str | None,
    progress: bool = True,
) -> tuple[RunSummary, Any, Any]:
    """`ipbatch eval` on one machine: the paper's protocol as a generation job, run here.
    Returns (the job's summary, its scores per adapter, what was prepared)."""
    from workers import evaluation

    started = time.monotonic()
    with local_context(settings) as ctx:
        manifest_uri = absolute_uri(manifest)
        output_uri = output or evaluation.default_output(ctx, manifest_uri, adapters, eval_settings)
        prepared = evaluation.prepare(
            ctx,
            manifest_uri=manifest_uri,
            adapters=adapters,
            settings=eval_settings,
            output_uri=output_uri,
        )
        summary = run_job(
            ctx,
            manifest=prepared.manifest_uri,
            output=output_uri,
            progress=progress,
            started=started,
        )
        scores, _ = evaluation.scores(ctx, job_id=summary.job_id, adapters=adapters)
        return summary, scores, prepared
