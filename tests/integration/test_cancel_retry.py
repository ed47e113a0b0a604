"""Cancelling in the ledger, on SQLite and PostgreSQL: what has not started stops at once."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.clock import utcnow
from storage.ledger import bulk, items, job_claims, jobs
from storage.lifecycle import EMBED, GENERATE, INGEST
from storage.models import ItemEvent, ItemStatus, JobStatus


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


def _job_with_items(
    s: Session, now: Any, sha: str, statuses: list[ItemStatus], max_failures: float | None = None
) -> tuple[str, list[int]]:
    """A running job, its manifest read, with items in `statuses`; the pending ones' ids."""
    job_id, _ = jobs.create(
        s,
        name="j",
        manifest_uri="m",
        manifest_sha256=sha * 64,
        output_uri="/o",
        now=now,
        options=jobs.JobOptions(max_failures=max_failures),
    )
    rows = [
        {"row_id": f"r{i}", "row_index": i, "status": status, "params": {}}
        for i, status in enumerate(statuses)
    ]
    ids = bulk.add_items(s, job_id=job_id, rows=rows, now=now)
    jobs.move(
        s,
        job_id=job_id,
        from_statuses=[JobStatus.PENDING],
        to_status=JobStatus.RUNNING,
        now=now,
        worker=None,
        message="test",
        values={"total_rows": len(statuses)},
    )
    return job_id, ids


def test_a_job_ends_succeeded_partial_or_failed(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    ok, bad = ItemStatus.SUCCEEDED, ItemStatus.FAILED
    with sessions.begin() as s:
        ended = {
            name: jobs.finalize(s, job_id=_job_with_items(s, now, sha, statuses)[0], now=now)
            for name, sha, statuses in (
                ("all", "1", [ok, ok]),
                ("some", "2", [ok, bad, ItemStatus.CANCELLED]),
                ("none", "3", [bad, bad]),
            )
        }
    assert ended == {
        "all": JobStatus.SUCCEEDED,
        "some": JobStatus.PARTIAL,
        "none": JobStatus.FAILED,
    }


def test_a_job_stops_itself_past_its_max_failures(sessions: sessionmaker[Session]) -> None:
    """Past --max-failures (a count, or a share of the rows) a running job fails with the
    reason, and its waiting items are cancelled with it; at or under the limit it goes on."""
    now = utcnow()
    p, bad = ItemStatus.PENDING, ItemStatus.FAILED
    with sessions.begin() as s:
        at_limit, _ = _job_with_items(s, now, "4", [bad, bad, p], max_failures=2)
        past, ids = _job_with_items(s, now, "5", [bad, bad, bad, p, p], max_failures=2)
        share, _ = _job_with_items(s, now, "6", [bad, p, p, p], max_failures=0.2)
        assert jobs.stop_if_too_many_failed(s, job_id=at_limit, now=now) is None
        reason = jobs.stop_if_too_many_failed(s, job_id=past, now=now)
        assert reason == "stopped early: 3 rows failed, more than --max-failures 2"
        assert jobs.stop_if_too_many_failed(s, job_id=share, now=now) == (
            "stopped early: 1 rows failed, more than --max-failures 0.2 of the 4 rows"
        )
    with sessions.begin() as s:
        job = jobs.get(s, job_id=past)
        assert job is not None and (job.status, job.error_message) == (JobStatus.FAILED, reason)
        assert {i.status for i in items.load_items(s, item_ids=ids)} == {ItemStatus.CANCELLED}
        said = s.scalars(
            select(ItemEvent.message).where(
                ItemEvent.item_id.in_(ids), ItemEvent.to_status == "cancelled"
            )
        ).all()
        assert said == [f"job {reason}"] * 2
        assert jobs.get(s, job_id=at_limit).status == JobStatus.RUNNING  # type: ignore[union-attr]
