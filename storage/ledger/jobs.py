"""Jobs: registering them, their guarded moves (`lifecycle.JOB_MOVES`, each one recorded in
`job_events`), the ingest's claim on a job, cancel and retry, and what the reaper looks for.

Ingest claims its job like a stage claims items: a lease with a fencing token
(`claim_ingest`), renewed with every chunk it writes (`hold_ingest`), ended when the manifest
has been read (`finish_ingest`) or given back (`release_ingest`). The train stage claims a
training job the same way (`claim` with its kind; the same hold and release). A job "waits
for ingest" while it is pending, or running with its manifest not fully read and nobody
holding it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.ledger import counters, outputs
from storage.ledger.db import is_postgres
from storage.ledger.items import iter_id_pages, transition
from storage.lifecycle import EMBED, JOB_ACTIVE, TERMINAL, WAITING, check_job_move
from storage.models import Item, ItemStatus, Job, JobEvent, JobKind, JobStatus


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
) -> tuple[str, bool]:
    """Register a job; the same manifest bytes and output again return the same job.

    Returns (job_id, created).
    """
    same = select(Job.id).where(
        Job.manifest_sha256 == manifest_sha256, Job.output_uri == output_uri
    )
    existing = session.scalar(same)
    if existing is not None:
        return existing, False
    job_id = uuid.uuid4().hex
    try:
        with session.begin_nested():
            session.add(
                Job(
                    id=job_id,
                    name=name,
                    manifest_uri=manifest_uri,
                    manifest_sha256=manifest_sha256,
                    output_uri=output_uri,
                    kind=kind,
                    status=JobStatus.PENDING,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
    except IntegrityError:  # a concurrent submit of the same manifest won
        existing = session.scalar(same)
        assert existing is not None
        return existing, False
    _event(session, job_id, None, JobStatus.PENDING, now, worker, "registered")
    return job_id, True


def get(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def _event(
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
    _event(session, job_id, before, to_status, now, worker, message)
    return before


# --- the ingest's claim --------------------------------------------------------------------


def _lease(token: str, seconds: float, now: datetime) -> dict[str, Any]:
    return {"lease_token": token, "lease_until": now + timedelta(seconds=seconds)}


# what a claim's job events say, by the kind of job it takes
_CLAIMED = {
    JobKind.GENERATE: ("ingest started", "ingest resumed where the last one stopped"),
    JobKind.TRAIN: ("training started", "training resumed from its last checkpoint"),
}


def claim(
    session: Session,
    *,
    job_id: str,
    kind: JobKind,
    worker: str,
    lease_seconds: float,
    now: datetime,
) -> str | None:
    """Take a job of `kind` (its ingest, or its training run): pending -> running, or resume a
    running one whose work is not done (no row count recorded yet) and whose last holder gave
    it back or let its lease run out. Returns the token every later write of this claim
    carries, or None (held, done, ended, or another kind of job)."""
    token = uuid.uuid4().hex
    lease = _lease(token, lease_seconds, now)
    started_message, resumed_message = _CLAIMED[kind]
    started = move(
        session,
        job_id=job_id,
        from_statuses=[JobStatus.PENDING],
        to_status=JobStatus.RUNNING,
        now=now,
        worker=worker,
        message=started_message,
        values={**lease, "started_at": now},
        where=[Job.kind == kind],  # a training job has no manifest to ingest, and vice versa
    )
    if started is not None:
        return token
    resumable = and_(
        Job.kind == kind,
        Job.total_rows.is_(None),
        or_(Job.lease_token.is_(None), Job.lease_until < now),
    )
    resumed = move(
        session,
        job_id=job_id,
        from_statuses=[JobStatus.RUNNING],
        to_status=JobStatus.RUNNING,
        now=now,
        worker=worker,
        message=resumed_message,
        values=lease,
        where=[resumable],
    )
    return token if resumed is not None else None


def claim_ingest(
    session: Session, *, job_id: str, worker: str, lease_seconds: float, now: datetime
) -> str | None:
    """Take the job for ingest (`claim` of a generation job)."""
    return claim(
        session,
        job_id=job_id,
        kind=JobKind.GENERATE,
        worker=worker,
        lease_seconds=lease_seconds,
        now=now,
    )


def hold_ingest(
    session: Session, *, job_id: str, token: str, lease_seconds: float, now: datetime
) -> JobStatus | None:
    """Before an ingest writes a chunk: lock the job row for this transaction (a cancel waits
    for the chunk, or the chunk sees the cancel), check the claim is still ours and renew it.
    Returns the job's status (running, or cancelled meanwhile), or None if the claim is lost."""
    locked = select(Job.status, Job.lease_token).where(Job.id == job_id)
    if is_postgres(session):
        locked = locked.with_for_update()
    row = session.execute(locked).one_or_none()
    if row is None or row.lease_token != token:
        return None
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    return JobStatus(row.status)


def finish_ingest(
    session: Session, *, job_id: str, token: str, total_rows: int, now: datetime, worker: str
) -> bool:
    """The manifest is read: record its row count (the job may finish from now on) and end
    the claim. False if the claim was lost (another ingest finishes instead)."""
    message = f"manifest read: {total_rows} rows"
    return _end_ingest(session, job_id, token, now, worker, message, {"total_rows": total_rows})


def release_ingest(
    session: Session, *, job_id: str, token: str, now: datetime, worker: str, message: str
) -> bool:
    """Give the claim back (an outage): the job waits for ingest again."""
    return _end_ingest(session, job_id, token, now, worker, message, {})


def _end_ingest(
    session: Session,
    job_id: str,
    token: str,
    now: datetime,
    worker: str,
    message: str,
    values: dict[str, Any],
) -> bool:
    status = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token)
        .values(lease_token=None, lease_until=None, updated_at=now, **values)
        .returning(Job.status)
    )
    if status is None:
        return False
    _event(session, job_id, status, status, now, worker, message)
    return True


def waits_for_ingest(job: Job, *, now: datetime) -> bool:
    """Pending, or running with its manifest not fully read and nobody holding it (given
    back, or its lease ran out): an ingest message should be on its way."""
    if job.status == JobStatus.PENDING:
        return True
    return (
        job.status == JobStatus.RUNNING
        and job.total_rows is None
        and (job.lease_token is None or job.lease_until is None or job.lease_until < now)
    )


def expired_ingests(
    session: Session, *, now: datetime, limit: int = 100, kind: JobKind = JobKind.GENERATE
) -> list[str]:
    """Jobs whose ingest's lease ran out: its worker died or hung mid-manifest (`kind`
    train: a training run's worker)."""
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.kind == kind,
                Job.status == JobStatus.RUNNING,
                Job.total_rows.is_(None),
                Job.lease_token.is_not(None),
                Job.lease_until < now,
            )
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


def stale_waiting(
    session: Session,
    *,
    idle_seconds: float,
    now: datetime,
    limit: int = 100,
    kind: JobKind = JobKind.GENERATE,
) -> list[str]:
    """Jobs waiting for ingest (`kind` train: for a training worker), unmoved for
    `idle_seconds`: if the queue is empty, their message was lost (a publish that failed
    after the job was registered, say)."""
    waiting = or_(
        Job.status == JobStatus.PENDING,
        and_(Job.status == JobStatus.RUNNING, Job.total_rows.is_(None), Job.lease_token.is_(None)),
    )
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.kind == kind, waiting, Job.updated_at < now - timedelta(seconds=idle_seconds)
            )
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


def requeue_ingest(
    session: Session,
    *,
    job_id: str,
    now: datetime,
    worker: str,
    message: str,
    idle_seconds: float | None = None,
) -> bool:
    """Record that the job's ingest is queued again (once per `idle_seconds` for a waiting
    job; at once for one whose ingest lease ran out, fencing that ingest off). True if this
    call did it: the caller then sends the message."""
    if idle_seconds is not None:
        due = and_(
            Job.lease_token.is_(None), Job.updated_at < now - timedelta(seconds=idle_seconds)
        )
    else:
        due = and_(Job.lease_token.is_not(None), Job.lease_until < now)
    for status in JOB_ACTIVE:
        moved = move(
            session,
            job_id=job_id,
            from_statuses=[status],
            to_status=status,
            now=now,
            worker=worker,
            message=message,
            values={"lease_token": None, "lease_until": None},
            where=[due, Job.total_rows.is_(None)],
        )
        if moved is not None:
            return True
    return False


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
    """running -> succeeded/failed once the manifest is read and no item is in flight."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.RUNNING or job.total_rows is None:
        return None
    counts = counters.item_counts(session, job_id=job_id)
    if any(n for status, n in counts.items() if status not in TERMINAL):
        return None
    final = (
        JobStatus.SUCCEEDED
        if counts.get(ItemStatus.SUCCEEDED, 0) == sum(counts.values())
        else JobStatus.FAILED
    )
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
    the generate stage cancels the rest when it sees the job cancelled. Returns how many items
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
                    message="job cancelled",
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
        job_from=[JobStatus.FAILED],
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
        job_from=[JobStatus.SUCCEEDED, JobStatus.FAILED],
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
