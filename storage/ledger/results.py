"""What happens once a job has ended: its results (one line per row) and its webhook.

A generation job that has ended (succeeded, partial, failed, cancelled) with none of its items
still in flight gets a results file; `results_uri` records it. A job with a `webhook_url` is
then notified until `notified_at` is set: each failed try is counted and the next one waits
(`webhook_after`, backing off), up to WEBHOOK_TRIES. Writing the file and calling the URL are
the workers' (`workers.stages.results`); what is due, and what happened, is recorded here.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.ledger import counters
from storage.ledger.queries import images
from storage.lifecycle import JOB_ENDED, TERMINAL
from storage.models import Item, Job, JobKind, Output

WEBHOOK_TRIES = 10
FIRST_WAIT = 30.0  # seconds before the second try; doubled each time, at most an hour
LONGEST_WAIT = 3600.0


def settled(session: Session, *, job_id: str) -> bool:
    """Has the job ended with no item of it still in flight (a cancel lets running batches
    finish: their outcome belongs in the results)?"""
    job = session.get(Job, job_id)
    if job is None or job.status not in JOB_ENDED or job.kind != JobKind.GENERATE:
        return False
    counts = counters.item_counts(session, job_id=job_id)
    return not any(n for status, n in counts.items() if status not in TERMINAL)


def without_results(session: Session, *, limit: int) -> list[str]:
    """Ended generation jobs whose results are not written yet (settled or not: the caller
    checks), oldest first."""
    query = (
        select(Job.id)
        .where(Job.status.in_(JOB_ENDED), Job.kind == JobKind.GENERATE, Job.results_uri.is_(None))
        .order_by(Job.finished_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def rows(session: Session, *, job_id: str, page: int = 1000) -> Iterator[dict[str, Any]]:
    """Each row of the job, in manifest order: id, status, error code and message (or the
    warning of a row that succeeded), its images' URIs, scores and seed."""
    last = -1
    while True:
        items = list(
            session.scalars(
                select(Item)
                .where(Item.job_id == job_id, Item.row_index > last)
                .order_by(Item.row_index)
                .limit(page)
            )
        )
        if not items:
            return
        last = items[-1].row_index
        made: dict[int, list[Output]] = {item.id: [] for item in items}
        for output in session.scalars(
            select(Output).where(Output.item_id.in_(list(made))).order_by(Output.image_index)
        ):
            made[output.item_id].append(output)
        for item in items:
            images = made[item.id]
            seed = images[0].seed if images else (item.params or {}).get("seed")
            yield {
                "id": item.row_id,
                "status": str(item.status),
                "error_code": item.error_code,
                "message": item.error_message or item.warning,
                "outputs": [o.uri for o in images],
                "scores": [{"clip_i": o.clip_i, "clip_t": o.clip_t} for o in images],
                "seed": seed,
                "gpu_seconds": round(sum(o.gpu_seconds or 0.0 for o in images), 3),
                # copied from an output made before (`workers.stages.reuse`), not generated
                "reused": bool(images) and all(o.reused_from is not None for o in images),
            }


def record_results(session: Session, *, job_id: str, uri: str) -> None:
    job = session.get(Job, job_id)
    assert job is not None
    job.results_uri = uri


def summary(session: Session, *, job_id: str) -> dict[str, Any]:
    """What the webhook is told: the job, its outcome, counts, where its results are."""
    job = session.get(Job, job_id)
    assert job is not None
    counts = {str(k): v for k, v in counters.item_counts(session, job_id=job_id).items()}
    return {
        "job_id": job.id,
        "name": job.name,
        "status": str(job.status),
        "run": job.run,
        "total": sum(counts.values()),
        **{status: counts.get(status, 0) for status in ("succeeded", "failed", "cancelled")},
        "error": job.error_message,
        "manifest": job.manifest_uri,
        "output": f"{job.output_uri}/{job.id}",
        "results": job.results_uri,
        "finished_at": None if job.finished_at is None else job.finished_at.isoformat(),
        **images(session, job_id=job_id),  # images recorded, and how many were copied
    }


def _due(now: datetime) -> list[Any]:
    return [
        Job.results_uri.is_not(None),
        Job.webhook_url.is_not(None),
        Job.notified_at.is_(None),
        Job.webhook_attempts < WEBHOOK_TRIES,
        (Job.webhook_after.is_(None)) | (Job.webhook_after <= now),
    ]


def due_webhooks(session: Session, *, now: datetime, limit: int) -> list[str]:
    """Jobs with results whose webhook has not answered yet and may be tried now."""
    query = select(Job.id).where(*_due(now)).order_by(Job.finished_at).limit(limit)
    return list(session.scalars(query))


def webhook_due(session: Session, *, job_id: str, now: datetime) -> bool:
    return session.scalar(select(Job.id).where(Job.id == job_id, *_due(now))) is not None


def webhook_answered(session: Session, *, job_id: str, now: datetime) -> None:
    job = session.get(Job, job_id)
    assert job is not None
    job.webhook_attempts += 1
    job.notified_at = now


def webhook_failed(session: Session, *, job_id: str, now: datetime) -> int:
    """One more failed try; the next waits twice as long as the last (30 s, 1 min, ... 1 h).
    Returns the tries made."""
    job = session.get(Job, job_id)
    assert job is not None
    job.webhook_attempts += 1
    wait = min(LONGEST_WAIT, FIRST_WAIT * 2 ** (job.webhook_attempts - 1))
    job.webhook_after = now + timedelta(seconds=wait)
    return job.webhook_attempts
