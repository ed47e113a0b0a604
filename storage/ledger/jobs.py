"""Jobs: registering them, their guarded moves (`lifecycle.JOB_MOVES`, each one recorded in
`job_events`), cancel and retry, and what the reaper looks for. The claim a job stage (ingest,
train) holds on a job is `storage.ledger.job_claims`. A job "waits for ingest" while it is
pending, or running with its manifest not fully read and nobody holding it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.ledger import counters, outputs
from storage.ledger.db import is_postgres
from storage.ledger.items import iter_id_pages, transition
from storage.lifecycle import EMBED, JOB_ACTIVE, TERMINAL, WAITING, check_job_move
from storage.models import Item, ItemStatus, Job, JobEvent, JobKind, JobStatus


@dataclass(frozen=True)
class JobOptions:
    """How a job runs, as its submitter asked (the options of `submit` and `run`)."""

    # stop early past this many failed rows (>= 1), or this share of the rows (< 1)
    max_failures: float | None = None
    webhook_url: str | None = None  # told when the job ends; a secret: never logged whole
    priority: int = 1  # lifecycle.PRIORITIES: low 0, normal 1, high 2
    reuse: bool = True  # copy images made before with the same fingerprint (--no-reuse)


def create(
    session: Session,
    *,
    name: str,
    manifest_uri: str,
    manifest_sha256: str,
    output_uri: str,
    now: datetime,
    worker: str | None = None,
    kind: JobKind = JobKind.GENERATE,
    options: JobOptions = JobOptions(),
) -> tuple[str, bool]:
    """Register a job; the same manifest bytes and output again return the same job (its
    newest run: `rerun` makes another).

    Returns (job_id, created).
    """
    same = (
        select(Job.id)
        .where(Job.manifest_sha256 == manifest_sha256, Job.output_uri == output_uri)
        .order_by(Job.run.desc())
        .limit(1)
    )
    existing = session.scalar(same)
    if existing is not None:
        return existing, False
    job = Job(
        id=uuid.uuid4().hex,
        name=name,
        manifest_uri=manifest_uri,
        manifest_sha256=manifest_sha256,
        output_uri=output_uri,
        kind=kind,
        status=JobStatus.PENDING,
        run=1,
        max_failures=options.max_failures,
        webhook_url=options.webhook_url,
        priority=options.priority,
        reuse=options.reuse,
        created_at=now,
        updated_at=now,
    )
    if not _added(session, job):  # a concurrent submit of the same manifest won
        existing = session.scalar(same)
        assert existing is not None
        return existing, False
    record_event(session, job.id, None, JobStatus.PENDING, now, worker, "registered")
    return job.id, True


def _added(session: Session, job: Job) -> bool:
    """Insert `job`; False if its (manifest, output, run) is taken meanwhile."""
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        return False
    return True


def rerun(
    session: Session, *, job_id: str, name: str | None, now: datetime, worker: str | None = None
) -> str:
    """A new run of an ended job: the same manifest (its bytes then, at the same URI) and
    output, a new id and its own outputs, linked to the run it repeats. ValueError for a job
    still running or a training job (a trained adapter's name is never reused)."""

    job = session.get(Job, job_id)
    if job is None:
        raise KeyError(job_id)
    if job.kind != JobKind.GENERATE:
        raise ValueError(
            f"job {job_id} is a training run: train again under a new --name (a trained "
            "adapter's name always means the same weights)"
        )
    if job.status in JOB_ACTIVE:
        raise ValueError(f"job {job_id} is still {job.status}: cancel it first, or wait")
    while True:
        last = session.scalar(
            select(func.max(Job.run)).where(
                Job.manifest_sha256 == job.manifest_sha256, Job.output_uri == job.output_uri
            )
        )
        again = Job(
            id=uuid.uuid4().hex,
            name=name or job.name,
            manifest_uri=job.manifest_uri,
            manifest_sha256=job.manifest_sha256,
            output_uri=job.output_uri,
            kind=job.kind,
            status=JobStatus.PENDING,
            run=int(last or 1) + 1,
            rerun_of=job.id,
            max_failures=job.max_failures,
            webhook_url=job.webhook_url,
            priority=job.priority,
            reuse=job.reuse,
            created_at=now,
            updated_at=now,
        )
        if _added(session, again):
            break
    message = f"registered: run {again.run}, again of job {job.id}"
    record_event(session, again.id, None, JobStatus.PENDING, now, worker, message)
    return again.id


def get(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def priority_of(session: Session, *, job_id: str | None = None, item_id: int | None = None) -> int:
    """The priority of a job, or of the job an item belongs to (normal if not found)."""
    query = select(Job.priority)
    if item_id is not None:
        query = query.join(Item, Item.job_id == Job.id).where(Item.id == item_id)
    else:
        query = query.where(Job.id == job_id)
    found = session.scalar(query)
    return 1 if found is None else int(found)


def record_event(
    session: Session,
    job_id: str,
    from_status: JobStatus | None,
    to_status: JobStatus,
    now: datetime,
    worker: str | None,
    message: str | None,
) -> None:
    session.execute(
        insert(JobEvent).values(
            job_id=job_id,
            from_status=None if from_status is None else str(from_status),
            to_status=str(to_status),
            worker=worker,
            message=message,
            created_at=now,
        )
    )


def move(
    session: Session,
    *,
    job_id: str,
    from_statuses: Sequence[JobStatus],
    to_status: JobStatus,
    now: datetime,
    worker: str | None,
    message: str | None,
    values: dict[str, Any] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
) -> JobStatus | None:
    """The one way a job's status changes: checked against JOB_MOVES, applied only if the job
    is still in one of `from_statuses` (and matches `where`), recorded in job_events.
    Returns the status it had, or None if it did not move."""
    for from_status in from_statuses:
        check_job_move(from_status, to_status)
    current = select(Job.status).where(
        Job.id == job_id, Job.status.in_(list(from_statuses)), *where
    )
    if is_postgres(session):
        current = current.with_for_update()
    before = session.scalar(current)
    if before is None:
        return None
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(status=to_status, updated_at=now, **(values or {}))
    )
    record_event(session, job_id, before, to_status, now, worker, message)
    return before


# --- the rest of a job's life --------------------------------------------------------------


def fail(
    session: Session, *, job_id: str, message: str, now: datetime, worker: str | None = None
) -> bool:
    """The job cannot run (its manifest cannot be read): failed, with the reason."""
    return (
        move(
            session,
            job_id=job_id,
            from_statuses=JOB_ACTIVE,
            to_status=JobStatus.FAILED,
            now=now,
            worker=worker,
            message=message,
            values={
                "error_message": message,
                "finished_at": now,
                "lease_token": None,
                "lease_until": None,
            },
        )
        is not None
    )


def finalize(
    session: Session, *, job_id: str, now: datetime, worker: str | None = None
) -> JobStatus | None:
    """running -> succeeded (every item), partial (some failed) or failed (none succeeded)
    once the manifest is read and no item is in flight."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.RUNNING or job.total_rows is None:
        return None
    counts = counters.item_counts(session, job_id=job_id)
    if any(n for status, n in counts.items() if status not in TERMINAL):
        return None
    succeeded = counts.get(ItemStatus.SUCCEEDED, 0)
    if succeeded == sum(counts.values()):
        final = JobStatus.SUCCEEDED
    else:
        final = JobStatus.PARTIAL if succeeded else JobStatus.FAILED
    moved = move(
        session,
        job_id=job_id,
        from_statuses=[JobStatus.RUNNING],
        to_status=final,
        now=now,
        worker=worker,
        message="every item ended",
        values={"finished_at": now},
        where=[Job.total_rows.is_not(None)],
    )
    return final if moved is not None else None


def cancel(
    session: Session, *, job_id: str, now: datetime, worker: str | None = None
) -> int | None:
    """Cancel a job: the job row, and every item not being generated (waiting for a stage, or
    being embedded: nothing of theirs is stored yet). Items being generated finish their batch:
    the generate stage cancels the rest when it sees the job has ended. Returns how many items
    were cancelled now, or None if the job had already ended."""
    before = move(
        session,
        job_id=job_id,
        from_statuses=JOB_ACTIVE,
        to_status=JobStatus.CANCELLED,
        now=now,
        worker=worker,
        message="cancelled",
        values={"finished_at": now},
    )
    if before is None:
        return None
    return _cancel_items(session, job_id=job_id, now=now, worker=worker, message="job cancelled")


def stop_if_too_many_failed(
    session: Session, *, job_id: str, now: datetime, worker: str | None = None
) -> str | None:
    """A running job with `max_failures` whose failed items pass it stops itself: failed,
    with the reason, and the items not being generated cancelled with it (the generate stage
    cancels the rest at its next batch). Returns the reason, or None if it goes on. A share
    (< 1) is judged once the whole manifest is read."""
    job = session.get(Job, job_id)
    if job is None or job.max_failures is None or job.status != JobStatus.RUNNING:
        return None
    counts = counters.item_counts(session, job_id=job_id)
    failed = counts.get(ItemStatus.FAILED, 0)
    limit = job.max_failures
    if limit < 1:
        if job.total_rows is None or failed <= limit * job.total_rows:
            return None
        allowed = f"{limit:g} of the {job.total_rows} rows"
    elif failed <= limit:
        return None
    else:
        allowed = f"{int(limit)}"
    reason = f"stopped early: {failed} rows failed, more than --max-failures {allowed}"
    moved = move(
        session,
        job_id=job_id,
        from_statuses=[JobStatus.RUNNING],
        to_status=JobStatus.FAILED,
        now=now,
        worker=worker,
        message=reason,
        values={"error_message": reason, "finished_at": now},
    )
    if moved is None:
        return None
    _cancel_items(session, job_id=job_id, now=now, worker=worker, message=f"job {reason}")
    return reason


def _cancel_items(
    session: Session, *, job_id: str, now: datetime, worker: str | None, message: str
) -> int:
    cancelled = 0
    for status in (*WAITING, EMBED.working):
        for ids in iter_id_pages(session, job_id=job_id, statuses=[status]):
            cancelled += len(
                transition(
                    session,
                    item_ids=ids,
                    from_status=status,
                    to_status=ItemStatus.CANCELLED,
                    now=now,
                    worker=worker,
                    message=message,
                )
            )
    return cancelled


def retry_failed(
    session: Session, *, job_id: str, now: datetime, worker: str | None = None
) -> list[int]:
    """Failed items of a job go back to pending (attempts reset, error cleared) and the job
    runs again. Rows that failed validation (`invalid_row`) stay failed: the manifest must
    change for them. Returns the ids to enqueue."""
    ids = list(
        session.scalars(
            select(Item.id)
            .where(
                Item.job_id == job_id,
                Item.status == ItemStatus.FAILED,
                or_(Item.error_code.is_(None), Item.error_code != "invalid_row"),
            )
            .order_by(Item.id)
        )
    )
    return _run_again(
        session,
        job_id=job_id,
        item_ids=ids,
        moves=(ItemStatus.FAILED, ItemStatus.PENDING),
        job_from=[JobStatus.FAILED, JobStatus.PARTIAL],
        messages=("retry requested", "retry: {n} failed items queued again"),
        now=now,
        worker=worker,
    )


def regenerate(
    session: Session,
    *,
    job_id: str,
    item_ids: Sequence[int],
    now: datetime,
    reason: str,
    worker: str | None = None,
) -> list[int]:
    """Succeeded items whose output objects are missing or broken go back to the generate
    stage (their outputs rows forgotten in the same transaction) and the job runs again.
    Returns the ids that moved (those still succeeded)."""
    return _run_again(
        session,
        job_id=job_id,
        item_ids=item_ids,
        moves=(ItemStatus.SUCCEEDED, ItemStatus.READY),
        job_from=[JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED],
        messages=(reason, "repair: {n} items whose outputs are missing or broken made again"),
        now=now,
        worker=worker,
        each=lambda chunk: outputs.forget(session, item_ids=chunk),
    )


def _run_again(
    session: Session,
    *,
    job_id: str,
    item_ids: Sequence[int],
    moves: tuple[ItemStatus, ItemStatus],
    job_from: list[JobStatus],
    messages: tuple[str, str],
    now: datetime,
    worker: str | None,
    each: Callable[[list[int]], None] | None = None,
) -> list[int]:
    """Items of an ended job moved back into a stage (a page of 1,000 at a time, `each` run
    on every page that moved) and the job running again. Returns the ids that moved."""
    moved: list[int] = []
    for lo in range(0, len(item_ids), 1000):
        chunk = transition(
            session,
            item_ids=list(item_ids[lo : lo + 1000]),
            from_status=moves[0],
            to_status=moves[1],
            now=now,
            worker=worker,
            message=messages[0],
        )
        if each is not None:
            each(chunk)
        moved += chunk
    if moved:
        move(
            session,
            job_id=job_id,
            from_statuses=job_from,
            to_status=JobStatus.RUNNING,
            now=now,
            worker=worker,
            message=messages[1].format(n=len(moved)),
            values={"finished_at": None},
        )
    return moved
