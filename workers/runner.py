"""`ipbatch run`: the whole job on one machine, no servers (SQLite + a local folder).

The same stage functions as the Celery workers, called in-process: register, ingest, embed,
generate. Running it again resumes: the same manifest gives the same job, items an
interrupted run left half-done are released, and finished items are not redone.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session
from tqdm import tqdm

from core.config import Settings
from storage import ledger
from storage.migrate import upgrade
from storage.models import ItemStatus, JobStatus
from workers import stages
from workers.context import StageContext

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


def run_local(
    settings: Settings, *, manifest: str, output: str | None, progress: bool = True
) -> RunSummary:
    started = time.monotonic()
    home = settings.resolved_home()
    with single_runner(home):
        upgrade(settings.ledger_url())
        ctx = StageContext.create(settings, mode="local")
        try:
            return run_job(
                ctx,
                manifest=manifest,
                output=output or str(home / "outputs"),
                progress=progress,
                started=started,
            )
        finally:
            ctx.close()


def run_job(
    ctx: StageContext, *, manifest: str, output: str, progress: bool, started: float
) -> RunSummary:
    """Register (or resume), ingest, embed and generate one job with `ctx`, in-process.
    `run_local` wraps it; benchmarks call it with a context whose models are already warm."""
    manifest_uri = manifest if "://" in manifest else str(Path(manifest).expanduser().resolve())
    output_uri = output if "://" in output else str(Path(output).expanduser().resolve())
    job_id, created = stages.register_job(ctx, manifest_uri=manifest_uri, output_uri=output_uri)
    if not created:
        _release_in_flight(ctx, job_id)

    stages.ingest(ctx, job_id=job_id, enqueue=lambda ids: None)
    images = _embed_and_generate(ctx, job_id, progress)
    return _summary(ctx, job_id, images=images, started=started)


def retry_local(settings: Settings, *, job_id: str, progress: bool = True) -> RunSummary:
    """`ipbatch retry JOB` in one-machine mode: failed items back to pending, then run them."""
    started = time.monotonic()
    with single_runner(settings.resolved_home()):
        upgrade(settings.ledger_url())
        ctx = StageContext.create(settings, mode="local")
        try:
            _release_in_flight(ctx, job_id)
            stages.retry_job(
                ctx,
                job_id=job_id,
                enqueue_embed=lambda ids: None,
                enqueue_generate=lambda ids: None,
            )
            images = _embed_and_generate(ctx, job_id, progress)
            return _summary(ctx, job_id, images=images, started=started)
        finally:
            ctx.close()


def _embed_and_generate(ctx: StageContext, job_id: str, progress: bool) -> int:
    """Embed every pending item of the job, then generate every ready one; returns images."""
    batch = ctx.settings.generate_batch
    with ctx.sessions.begin() as session:
        pending = _all_ids(session, job_id, ItemStatus.PENDING)
    bar = tqdm(total=len(pending), desc="embed", unit="item", disable=not progress)
    for ids in stages.chunked(pending, batch):
        stages.embed(ctx, item_ids=ids)
        bar.update(len(ids))
    bar.close()
    with ctx.sessions.begin() as session:
        ready = _ready_grouped_by_adapters(session, job_id)
    bar = tqdm(total=len(ready), desc="generate", unit="item", disable=not progress)
    images = 0
    # bigger calls than the queue's messages: more rows to batch, more overlap
    for ids in stages.chunked(ready, max(batch, 8 * ctx.batch_images)):
        images += stages.generate(ctx, item_ids=ids).images
        bar.update(len(ids))
    bar.close()
    return images


def _summary(ctx: StageContext, job_id: str, *, images: int, started: float) -> RunSummary:
    with ctx.sessions.begin() as session:
        ledger.finalize_job(session, job_id=job_id)
        job = ledger.get_job(session, job_id=job_id)
        assert job is not None
        counts = {str(k): v for k, v in ledger.item_counts(session, job_id=job_id).items()}
        failures = [
            (i.row_id, i.error_code, i.error_message)
            for i in ledger.items_in_status(
                session, job_id=job_id, statuses=[ItemStatus.FAILED], limit=MAX_FAILURES_SHOWN
            )
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
        )


def _ready_grouped_by_adapters(session: Session, job_id: str) -> list[int]:
    """Ready items, grouped by adapter set so each warm pipeline is built once."""
    keyed: list[tuple[tuple[str, ...], int]] = []
    for ids in ledger.iter_id_pages(session, job_id=job_id, statuses=[ItemStatus.READY]):
        keyed.extend(
            (stages.adapter_set(item.params), item.id)
            for item in ledger.load_items(session, item_ids=ids)
        )
    return [item_id for _, item_id in sorted(keyed)]


def _all_ids(session: Session, job_id: str, status: ItemStatus) -> list[int]:
    pages = ledger.iter_id_pages(session, job_id=job_id, statuses=[status])
    return [item_id for page in pages for item_id in page]


def _release_in_flight(ctx: StageContext, job_id: str) -> None:
    """Items a killed run left claimed go back to waiting (we hold the only runner lock)."""
    with ctx.sessions.begin() as session:
        job = ledger.get_job(session, job_id=job_id)
        if job is not None and job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            return
        for working, waiting in (
            (ItemStatus.EMBEDDING, ItemStatus.PENDING),
            (ItemStatus.RUNNING, ItemStatus.READY),
        ):
            ids = _all_ids(session, job_id, working)
            ledger.transition(
                session,
                item_ids=ids,
                from_status=working,
                to_status=waiting,
                worker=ctx.worker,
                message="released: the previous run was interrupted",
            )
