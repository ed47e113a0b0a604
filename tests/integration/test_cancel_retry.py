"""Cancelling in the ledger, on SQLite and PostgreSQL: what has not started stops at once."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from core.clock import utcnow
from storage.ledger import bulk, items, job_claims, jobs
from storage.lifecycle import EMBED, GENERATE, INGEST
from storage.models import ItemStatus, JobStatus


def test_cancel_stops_what_has_not_started(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions.begin() as s:
        job_id, _ = jobs.create(
            s, name="j", manifest_uri="m", manifest_sha256="e" * 64, output_uri="/o", now=now
        )
        job_claims.claim(s, job_id=job_id, stage=INGEST, worker="ingest", lease_seconds=60, now=now)
        rows = [
            {"row_id": f"r{i}", "row_index": i, "status": ItemStatus.PENDING, "params": {}}
            for i in range(6)
        ]
        ids = bulk.add_items(s, job_id=job_id, rows=rows, now=now)
        claim = {"worker": "w", "lease_seconds": 60, "now": now}
        embedding = items.claim(s, item_ids=ids[:4], stage=EMBED, **claim)
        items.transition(
            s,
            item_ids=ids[:3],
            from_status=EMBED.working,
            to_status=EMBED.next,
            now=now,
            token=embedding.token,
        )
        running = items.claim(s, item_ids=ids[:2], stage=GENERATE, **claim)
        finish = {"from_status": GENERATE.working, "to_status": GENERATE.next, "now": now}
        items.transition(s, item_ids=ids[:1], token=running.token, **finish)
    # now: succeeded 1, running 1, ready 1, embedding 1, pending 2
    with sessions.begin() as s:
        assert jobs.cancel(s, job_id=job_id, worker="me", now=now) == 4
    with sessions.begin() as s:
        statuses = [i.status for i in items.load_items(s, item_ids=ids)]
        job = jobs.get(s, job_id=job_id)
        assert job is not None and job.status == JobStatus.CANCELLED and job.finished_at
        assert jobs.cancel(s, job_id=job_id, now=now) is None  # once is enough
    assert statuses == [ItemStatus.SUCCEEDED, ItemStatus.RUNNING] + [ItemStatus.CANCELLED] * 4
    with sessions.begin() as s:  # the running one finishes its batch; the job stays cancelled
        assert items.transition(s, item_ids=ids[1:2], token=running.token, **finish) == ids[1:2]
        assert jobs.finalize(s, job_id=job_id, now=now) is None
        assert jobs.get(s, job_id=job_id).status == JobStatus.CANCELLED  # type: ignore[union-attr]


def test_runs_of_a_job(sessions: sessionmaker[Session]) -> None:
    """A running job cannot be run again; an ended one can, as run 2, 3...: each with its own
    id, linked to the run it repeats; registering the manifest again returns the newest."""
    import pytest

    now = utcnow()
    key = {"manifest_uri": "m", "manifest_sha256": "f" * 64, "output_uri": "/o", "now": now}
    with sessions.begin() as s:
        first, created = jobs.create(s, name="night", **key)
        assert created
        with pytest.raises(ValueError, match="still pending: cancel it first"):
            jobs.rerun(s, job_id=first, name=None, now=now)
        jobs.cancel(s, job_id=first, worker="me", now=now)
        second = jobs.rerun(s, job_id=first, name=None, now=now)
        third = jobs.rerun(s, job_id=first, name="again", now=now)  # an older run, again
    with sessions.begin() as s:
        made = {j: jobs.get(s, job_id=j) for j in (first, second, third)}
        assert [(made[j].run, made[j].rerun_of, made[j].name) for j in (second, third)] == [
            (2, first, "night"),
            (3, first, "again"),
        ]
        assert made[second].status == JobStatus.PENDING
        assert jobs.create(s, name="x", **key) == (third, False)  # the newest run
