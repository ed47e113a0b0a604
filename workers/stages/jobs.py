"""What happens to whole jobs: submit, cancel, retry, and the reaper that recovers work.

Each function works the same under Celery and on one machine: what it sends goes through
the `send` / `send_ingest` / `send_job` it is given (Celery messages, or nothing for the
runner).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlalchemy.orm import Session

from core.errors import ConfigError
from storage.ledger import counters, items, job_claims, jobs, queries
from storage.lifecycle import JOB_ACTIVE, JOB_STAGES, STAGES, JobStage, Stage
from storage.models import ItemStatus, Job, JobKind, JobStatus
from workers.context import StageContext
from workers.stages import results
from workers.stages.common import Send, SendJob, SendJobStage, send_in_messages, send_waiting

log = logging.getLogger(__name__)


# --- submit ---------------------------------------------------------------------------------


def manifest_sha256(ctx: StageContext, manifest_uri: str) -> str:
    digest = hashlib.sha256()
    with ctx.stores.for_uri(manifest_uri).open(manifest_uri) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def webhook_for(ctx: StageContext, given: str | None) -> str | None:
    """The job's webhook: the one given (`--webhook`), else IPBATCH_WEBHOOK_URL, checked."""
    configured = ctx.settings.webhook_url
    url = given or (configured.get_secret_value() if configured is not None else None)
    return None if url is None else results.check_webhook_url(url)


def register(
    ctx: StageContext,
    *,
    manifest_uri: str,
    output_uri: str,
    name: str | None = None,
    options: jobs.JobOptions = jobs.JobOptions(),
) -> tuple[str, bool]:
    """Record a job for a manifest; the same bytes and output give the same job.
    Returns (job id, created)."""
    sha = manifest_sha256(ctx, manifest_uri)
    with ctx.sessions.begin() as session:
        return jobs.create(
            session,
            name=name or PurePosixPath(manifest_uri.rstrip("/")).name,
            manifest_uri=manifest_uri,
            manifest_sha256=sha,
            output_uri=output_uri.rstrip("/"),
            now=ctx.clock(),
            worker=ctx.worker,
            options=options,
        )


def submit(
    ctx: StageContext,
    *,
    manifest_uri: str,
    output_uri: str,
    send_ingest: SendJob,
    name: str | None = None,
    rerun_ended: bool = False,
    options: jobs.JobOptions = jobs.JobOptions(),
) -> tuple[str, bool]:
    """Register the job and send its ingest. Submitting the same manifest again returns the
    same job, and sends its ingest again if the job still waits for one (its first message
    was never sent, or lost): a job is never stranded by a failed publish. A duplicate
    ingest message does nothing. With `rerun_ended`, an ended job of the same manifest and
    output is run again instead (`rerun`). The output must be writable first: a bucket that
    does not exist (ipbatch never creates buckets) or may not be written is said now, not by
    every worker later. Returns (job id, created)."""
    if not ctx.stores.for_uri(output_uri).probe_writes(output_uri):
        log.warning(
            "%s ignores conditional writes: an image is stored once because each worker checks "
            "its claim before uploading (README, Running it for real)",
            output_uri,
        )
    job_id, created = register(
        ctx,
        manifest_uri=manifest_uri,
        output_uri=output_uri,
        name=name,
        options=options,
    )
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        assert job is not None
        waiting = job_claims.waits(job, now=ctx.clock())
        ended = job.status not in JOB_ACTIVE
    if rerun_ended and not created and ended:
        return rerun(ctx, job_id=job_id, send_ingest=send_ingest, name=name), True
    if created or waiting:
        send_ingest(job_id)
    return job_id, created


def rerun(ctx: StageContext, *, job_id: str, send_ingest: SendJob, name: str | None = None) -> str:
    """Run an ended generation job again (`ipbatch rerun`): a new job of the same manifest
    and output, with its own id and outputs, linked to the one it repeats; its ingest sent.
    ConfigError for a job that does not exist, still runs, or is a training run."""
    with ctx.sessions.begin() as session:
        _job_or_error(session, job_id)
        try:
            again = jobs.rerun(
                session, job_id=job_id, name=name, now=ctx.clock(), worker=ctx.worker
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    send_ingest(again)
    return again


# --- cancel and retry -----------------------------------------------------------------------


def cancel(ctx: StageContext, *, job_id: str) -> int | None:
    """Cancel a job at once: items not being generated are cancelled now, running ones at the
    end of their batch (the job's results are written once they have). Returns how many items
    were cancelled now, None if the job had already ended."""
    with ctx.sessions.begin() as session:
        _job_or_error(session, job_id)
        cancelled = jobs.cancel(session, job_id=job_id, now=ctx.clock(), worker=ctx.worker)
    if cancelled is not None:
        results.after_end(ctx, [job_id])
    return cancelled


def retry(ctx: StageContext, *, job_id: str, send: Send) -> tuple[int, int]:
    """Failed items (not invalid rows) back to pending, and every waiting item of the job
    sent again: the retried ones, and any left waiting without a message (e.g. released
    when a worker hit a configuration error). A duplicate message finds nothing to claim.
    Returns (items retried, other waiting items sent again)."""
    with ctx.sessions.begin() as session:
        job = _job_or_error(session, job_id)
        if job.status == JobStatus.CANCELLED:
            raise ConfigError(
                f"job {job_id} was cancelled: `ipbatch rerun {job_id}` runs its manifest again"
            )
        retried = jobs.retry_failed(session, job_id=job_id, now=ctx.clock(), worker=ctx.worker)
    sent = sum(
        send_waiting(ctx, job_id=job_id, stage=stage, send=send, statuses=[stage.waiting])
        for stage in STAGES
    )
    return len(retried), sent - len(retried)


def describe(ctx: StageContext, *, job_id: str) -> tuple[JobKind, JobStatus] | None:
    """A job's kind and status; None if there is no such job."""
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        return None if job is None else (JobKind(job.kind), JobStatus(job.status))


def recount(ctx: StageContext, *, job_id: str | None = None) -> dict[str, dict[ItemStatus, int]]:
    """Rebuild the status counters behind job_progress from the items (after hand edits), of
    one job or of every job; ConfigError for a job that does not exist."""
    with ctx.sessions.begin() as session:
        if job_id is not None:
            _job_or_error(session, job_id)
        job_ids = [job_id] if job_id else queries.job_ids(session)
        return {one: counters.recount(session, job_id=one) for one in job_ids}


def _job_or_error(session: Session, job_id: str) -> Job:
    job = jobs.get(session, job_id=job_id)
    if job is None:
        raise ConfigError(f"no job {job_id}")
    return job


# --- the reaper -----------------------------------------------------------------------------


@dataclass
class Reaped:
    items: int = 0  # items sent again
    jobs: int = 0  # jobs sent again to their stage (ingest, train)
    results: int = 0  # ended jobs whose results or webhook were looked at


def reap(
    ctx: StageContext,
    *,
    send: Send,
    send_job: SendJobStage,
    queue_depth: Callable[[str], int] | None = None,
) -> Reaped:
    """Recover work nobody is doing. For every stage: items whose worker's lease ran out
        (killed, machine lost, hung past its heartbeat) go back to waiting and are sent again;
        with `queue_depth` (messages waiting in a queue), items waiting for a stage whose queue is
        empty, unmoved for IPBATCH_REQUEUE_AFTER seconds, lost their message (a broker restart, a
        publish that failed for good) and are sent again too. The same for every job stage (ingest,
    train: `lifecycle.JOB_STAGES`) and the jobs it claims.

        Safe to run anywhere, any number of times: moves are guarded transitions, a live worker's
        claim is never touched, and a duplicate message finds nothing to claim. What it sends
        should go to the front of the queue (the caller's `send`)."""
    idle = ctx.settings.requeue_after
    reaped = Reaped()
    for stage in STAGES:
        reaped.items += _send_again(
            ctx,
            stage,
            send,
            find=functools.partial(items.expired_leases, working=stage.working),
            from_status=stage.working,
            why="lease expired: released by the reaper",
        )
        if queue_depth is not None and queue_depth(stage.queue) == 0:
            reaped.items += _send_again(
                ctx,
                stage,
                send,
                find=functools.partial(
                    items.stale_waiting, waiting=stage.waiting, idle_seconds=idle
                ),
                from_status=stage.waiting,
                why=f"no message for {idle:g} s and the {stage.queue} queue is empty: "
                "queued again by the reaper",
            )
    for job_stage in JOB_STAGES:
        reaped.jobs += _send_job_again(ctx, job_stage, send_job, queue_depth)
    # ended jobs: results not written yet (a worker died after the end), webhooks due again
    reaped.results = results.catch_up(ctx)
    return reaped


def _send_again(
    ctx: StageContext,
    stage: Stage,
    send: Send,
    *,
    find: Callable[..., list[int]],
    from_status: ItemStatus,
    why: str,
) -> int:
    """Move what `find(session, now=...)` returns back to the stage's waiting status (guarded:
    only what has not moved meanwhile), then send it; a thousand at a time."""
    total = 0
    while True:
        with ctx.sessions.begin() as session:
            found = find(session, now=ctx.clock())
            moved = items.transition(
                session,
                item_ids=found,
                from_status=from_status,
                to_status=stage.waiting,
                now=ctx.clock(),
                worker=ctx.worker,
                message=why,
            )
        send_in_messages(ctx.settings, send, stage, moved)
        total += len(moved)
        if not moved or len(found) < 1000:
            return total


def _send_job_again(
    ctx: StageContext,
    stage: JobStage,
    send_job: SendJobStage,
    queue_depth: Callable[[str], int] | None,
) -> int:
    """Jobs whose claim for `stage` ran out (its worker died mid manifest, mid training run),
    and (with the stage's queue empty) jobs that have waited for it for IPBATCH_REQUEUE_AFTER
    seconds: their message is sent again."""
    idle = ctx.settings.requeue_after
    with ctx.sessions.begin() as session:
        now = ctx.clock()
        due: list[tuple[str, float | None]] = [
            (job_id, None) for job_id in job_claims.expired(session, stage=stage, now=now)
        ]
        if queue_depth is not None and queue_depth(stage.queue) == 0:
            due += [
                (job_id, idle)
                for job_id in job_claims.stale_waiting(
                    session, idle_seconds=idle, now=now, stage=stage
                )
            ]
    sent = 0
    for job_id, idle_seconds in due:
        why = (
            f"{stage.label} lease expired: {stage.name} queued again by the reaper"
            if idle_seconds is None
            else f"no {stage.name} message for {idle:g} s and the {stage.queue} queue is empty: "
            "queued again by the reaper"
        )
        with ctx.sessions.begin() as session:
            requeued = job_claims.requeue(
                session,
                job_id=job_id,
                now=ctx.clock(),
                worker=ctx.worker,
                message=why,
                idle_seconds=idle_seconds,
            )
        if requeued:
            send_job(stage, job_id)
            sent += 1
    return sent
