"""Training jobs (jobs.kind = 'train'): registering one, the train stage's claim on it, its
progress (loss curve, checkpoints, validation scores) and its end.

The train stage claims its job like ingest does (a lease with a fencing token, renewed by a
heartbeat with every logged step): a worker that dies leaves a lease that runs out, and the
next delivery of the message (or `ipbatch retry`) resumes from the last checkpoint recorded
here. Every write of a run checks the token first: a worker that lost its claim changes
nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from storage.ledger import job_claims, jobs
from storage.models import (
    Job,
    JobKind,
    JobStatus,
    TrainingCheckpoint,
    TrainingLog,
    TrainingRun,
    TrainingValidation,
)


class NameTaken(ValueError):
    """`custom:<name>` already names another training run: adapters are never replaced."""


def register(
    session: Session,
    *,
    name: str,
    manifest_uri: str,
    manifest_sha256: str,
    output_uri: str,
    settings: dict[str, Any],
    total_steps: int,
    now: datetime,
    worker: str | None = None,
) -> tuple[str, bool]:
    """A training job for `name`; the same name with the same manifest and settings again
    returns the same job (it resumes). Returns (job_id, created)."""
    run = session.scalar(select(TrainingRun).where(TrainingRun.name == name))
    if run is not None:
        job = session.get(Job, run.job_id)
        assert job is not None
        if job.manifest_sha256 != manifest_sha256 or run.settings != settings:
            raise NameTaken(
                f"an adapter named {name!r} was already trained (job {job.id}) from another "
                "manifest or with other settings; choose another name"
            )
        return job.id, False
    job_id, created = jobs.create(
        session,
        name=name,
        manifest_uri=manifest_uri,
        manifest_sha256=manifest_sha256,
        output_uri=output_uri,
        now=now,
        worker=worker,
        kind=JobKind.TRAIN,
    )
    session.add(
        TrainingRun(
            job_id=job_id, name=name, settings=settings, total_steps=total_steps, updated_at=now
        )
    )
    session.flush()
    return job_id, created


def get(session: Session, *, job_id: str) -> TrainingRun | None:
    return session.get(TrainingRun, job_id)


def by_name(session: Session, *, name: str) -> TrainingRun | None:
    return session.scalar(select(TrainingRun).where(TrainingRun.name == name))


def holds(session: Session, *, job_id: str, token: str) -> bool:
    return session.scalar(select(Job.lease_token).where(Job.id == job_id)) == token


def progress(
    session: Session,
    *,
    job_id: str,
    token: str,
    log: list[tuple[int, float, float, int]],
    skipped_steps: int,
    lease_seconds: float,
    now: datetime,
) -> JobStatus | None:
    """The heartbeat: renew the claim and record the points logged since the last one
    ((step, loss, learning rate, steps skipped since the previous point) each) and the
    run's skipped steps in all. Returns the job's status (running, or cancelled
    meanwhile), or None if the claim is lost (nothing is written then)."""
    status = job_claims.hold(
        session, job_id=job_id, token=token, lease_seconds=lease_seconds, now=now
    )
    if status is None or not log:
        return status
    steps = [step for step, *_ in log]  # a resumed run logs again the steps after its
    session.execute(  # checkpoint: the new values replace the old
        delete(TrainingLog).where(TrainingLog.job_id == job_id, TrainingLog.step.in_(steps))
    )
    session.execute(
        insert(TrainingLog),
        [
            {
                "job_id": job_id,
                "step": s,
                "loss": loss,
                "learning_rate": lr,
                "skipped_steps": skipped,
                "created_at": now,
            }
            for s, loss, lr, skipped in log
        ],
    )
    step, loss, lr, _ = log[-1]
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.job_id == job_id)
        .values(step=step, loss=loss, learning_rate=lr, skipped_steps=skipped_steps, updated_at=now)
    )
    return status


def set_data(
    session: Session, *, job_id: str, examples: int, skipped: list[dict[str, Any]], now: datetime
) -> None:
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.job_id == job_id)
        .values(examples=examples, skipped=skipped, updated_at=now)
    )


def checkpoints(session: Session, *, job_id: str) -> list[TrainingCheckpoint]:
    """Newest first."""
    query = (
        select(TrainingCheckpoint)
        .where(TrainingCheckpoint.job_id == job_id)
        .order_by(TrainingCheckpoint.step.desc())
    )
    return list(session.scalars(query))


def add_checkpoint(
    session: Session, *, job_id: str, token: str, step: int, uri: str, keep: int, now: datetime
) -> list[str] | None:
    """Record a checkpoint written to `uri`; the ones past the newest `keep` leave the ledger
    and their URIs are returned (to delete). None if the claim is lost."""
    if not holds(session, job_id=job_id, token=token):
        return None
    session.execute(
        delete(TrainingCheckpoint).where(
            TrainingCheckpoint.job_id == job_id, TrainingCheckpoint.step == step
        )
    )
    session.add(TrainingCheckpoint(job_id=job_id, step=step, uri=uri, created_at=now))
    session.flush()
    old = checkpoints(session, job_id=job_id)[keep:]
    for checkpoint in old:
        session.delete(checkpoint)
    return [c.uri for c in old]


def add_validation(
    session: Session,
    *,
    job_id: str,
    token: str,
    step: int,
    clip_i: float,
    clip_t: float | None,
    samples: list[str],
    now: datetime,
) -> bool:
    if not holds(session, job_id=job_id, token=token):
        return False
    session.execute(
        delete(TrainingValidation).where(
            TrainingValidation.job_id == job_id, TrainingValidation.step == step
        )
    )
    session.add(
        TrainingValidation(
            job_id=job_id, step=step, clip_i=clip_i, clip_t=clip_t, samples=samples, created_at=now
        )
    )
    return True


def finish(
    session: Session,
    *,
    job_id: str,
    token: str,
    adapter_uri: str,
    card: dict[str, Any],
    now: datetime,
    worker: str,
) -> bool:
    """The adapter is exported: the run succeeded. False if the claim was lost."""
    moved = jobs.move(
        session,
        job_id=job_id,
        from_statuses=[JobStatus.RUNNING],
        to_status=JobStatus.SUCCEEDED,
        now=now,
        worker=worker,
        message=f"adapter written to {adapter_uri}",
        values={"finished_at": now, "lease_token": None, "lease_until": None},
        where=[Job.lease_token == token],
    )
    if moved is None:
        return False
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.job_id == job_id)
        .values(adapter_uri=adapter_uri, card=card, updated_at=now)
    )
    return True


def log(session: Session, *, job_id: str) -> list[TrainingLog]:
    query = select(TrainingLog).where(TrainingLog.job_id == job_id).order_by(TrainingLog.step)
    return list(session.scalars(query))


def validations(session: Session, *, job_id: str) -> list[TrainingValidation]:
    query = (
        select(TrainingValidation)
        .where(TrainingValidation.job_id == job_id)
        .order_by(TrainingValidation.step)
    )
    return list(session.scalars(query))


def retry(session: Session, *, job_id: str, now: datetime, worker: str | None = None) -> bool:
    """`ipbatch retry` of a failed training job: running again, nobody holding it (the next
    claim resumes from its last checkpoint)."""
    moved = jobs.move(
        session,
        job_id=job_id,
        from_statuses=[JobStatus.FAILED],
        to_status=JobStatus.RUNNING,
        now=now,
        worker=worker,
        message="retry: training resumes from its last checkpoint",
        values={"finished_at": None, "error_message": None, "lease_token": None},
        where=[Job.kind == JobKind.TRAIN],
    )
    return moved is not None
