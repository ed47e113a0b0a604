"""The claim a job stage (ingest, train: `lifecycle.JOB_STAGES`) holds on a whole job, like
a stage's claim on items: a lease with a fencing token on the job row (`claim`), renewed as it
works (`hold`: with every chunk an ingest writes, every heartbeat of a training run), ended
when the work is done or given back (`end`). `expired` finds the claims whose worker died.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from storage.ledger.jobs import move, record_event
from storage.lifecycle import JOB_ACTIVE, JobStage
from storage.models import Job, JobStatus


def _lease(token: str, seconds: float, now: datetime) -> dict[str, Any]:
    return {"lease_token": token, "lease_until": now + timedelta(seconds=seconds)}


def claim(
    session: Session,
    *,
    job_id: str,
    stage: JobStage,
    worker: str,
    lease_seconds: float,
    now: datetime,
) -> str | None:
    """Take a job of the stage's kind: pending -> running, or resume a running one whose work
    is not done (no row count recorded yet) and whose last holder gave it back or let its
    lease run out. Returns the token every later write of this claim carries, or None (held,
    done, ended, or another kind of job)."""
    token = uuid.uuid4().hex
    lease = _lease(token, lease_seconds, now)
    started = move(
        session,
        job_id=job_id,
        from_statuses=[JobStatus.PENDING],
        to_status=JobStatus.RUNNING,
        now=now,
        worker=worker,
        message=stage.started,
        values={**lease, "started_at": now},
        where=[Job.kind == stage.kind],  # a training job has no manifest to ingest, and so on
    )
    if started is not None:
        return token
    resumable = and_(
        Job.kind == stage.kind,
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
        message=stage.resumed,
        values=lease,
        where=[resumable],
    )
    return token if resumed is not None else None


def hold(
    session: Session, *, job_id: str, token: str, lease_seconds: float, now: datetime
) -> JobStatus | None:
    """Before a claim's holder writes: lock the job row for this transaction (a cancel waits
    for the write, or the write sees the cancel), check the claim is still ours and renew it.
    Returns the job's status (running, or cancelled meanwhile), or None if the claim is lost."""
    # one statement: the UPDATE locks the row as it renews the claim, and matches nothing if
    # the claim is another's (PostgreSQL re-reads a row another transaction changed first)
    status = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token)
        .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
        .returning(Job.status)
    ).scalar_one_or_none()
    return None if status is None else JobStatus(status)


def end(
    session: Session,
    *,
    job_id: str,
    token: str,
    now: datetime,
    worker: str,
    message: str,
    values: dict[str, Any] | None = None,
) -> bool:
    """End the claim, recording `message` (and `values` on the job: an ingest's row count);
    without values this gives the job back (an outage): it waits for its stage again. False if
    the claim was lost."""
    status = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token)
        .values(lease_token=None, lease_until=None, updated_at=now, **(values or {}))
        .returning(Job.status)
    )
    if status is None:
        return False
    record_event(session, job_id, status, status, now, worker, message)
    return True


def end_any(session: Session, *, job_id: str, now: datetime, worker: str, message: str) -> bool:
    """End whatever claim the job has (the one-machine runner, which holds the only lock on
    the ledger: an interrupted run's claim is nobody's)."""
    token = session.scalar(select(Job.lease_token).where(Job.id == job_id))
    if token is None:
        return False
    return end(session, job_id=job_id, token=token, now=now, worker=worker, message=message)


def expired(session: Session, *, stage: JobStage, now: datetime, limit: int = 100) -> list[str]:
    """Jobs of the stage's kind whose claim's lease ran out: its worker died or hung (mid
    manifest, mid training run)."""
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.kind == stage.kind,
                Job.status == JobStatus.RUNNING,
                Job.total_rows.is_(None),
                Job.lease_token.is_not(None),
                Job.lease_until < now,
            )
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


# --- waiting for a job stage ----------------------------------------------------------------


def waits(job: Job, *, now: datetime) -> bool:
    """Pending, or running with its work not done and nobody holding it (given back, or its
    lease ran out): a message for its stage (ingest, train) should be on its way."""
    if job.status == JobStatus.PENDING:
        return True
    return (
        job.status == JobStatus.RUNNING
        and job.total_rows is None
        and (job.lease_token is None or job.lease_until is None or job.lease_until < now)
    )


def stale_waiting(
    session: Session,
    *,
    idle_seconds: float,
    now: datetime,
    stage: JobStage,
    limit: int = 100,
) -> list[str]:
    """Jobs waiting for the stage, unmoved for `idle_seconds`: if its queue is empty, their
    message was lost (a publish that failed after the job was registered, say)."""
    waiting = or_(
        Job.status == JobStatus.PENDING,
        and_(Job.status == JobStatus.RUNNING, Job.total_rows.is_(None), Job.lease_token.is_(None)),
    )
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.kind == stage.kind,
                waiting,
                Job.updated_at < now - timedelta(seconds=idle_seconds),
            )
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


def requeue(
    session: Session,
    *,
    job_id: str,
    now: datetime,
    worker: str,
    message: str,
    idle_seconds: float | None = None,
) -> bool:
    """Record that the job's stage is queued again (once per `idle_seconds` for a waiting
    job; at once for one whose claim's lease ran out, fencing that claim's holder off). True
    if this call did it: the caller then sends the message."""
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
