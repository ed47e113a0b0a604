"""Ledger transitions on SQLite and PostgreSQL: guarded, idempotent, recorded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger
from storage.migrate import upgrade
from storage.models import ItemEvent, ItemStatus, JobStatus, Output


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    engine = ledger.make_engine(url)
    yield ledger.make_sessions(engine)
    engine.dispose()


def new_job(
    sessions: sessionmaker[Session], n_valid: int = 3, n_invalid: int = 1
) -> tuple[str, list[int]]:
    with sessions.begin() as s:
        job_id, created = ledger.create_job(
            s, name="j", manifest_uri="m.jsonl", manifest_sha256="ab" * 32, output_uri="/out"
        )
        assert created
        ledger.start_job(s, job_id=job_id)
        rows = [
            {
                "row_id": f"r{i}",
                "row_index": i,
                "status": ItemStatus.PENDING,
                "params": {"id": f"r{i}"},
            }
            for i in range(n_valid)
        ]
        rows += [
            {
                "row_id": None,
                "row_index": n_valid + i,
                "status": ItemStatus.FAILED,
                "error_code": "invalid_row",
                "error_message": "line x: bad",
            }
            for i in range(n_invalid)
        ]
        pending = ledger.add_items(s, job_id=job_id, rows=rows)
    return job_id, pending


def statuses(sessions: sessionmaker[Session], ids: list[int]) -> list[str]:
    with sessions.begin() as s:
        return [str(i.status) for i in ledger.load_items(s, item_ids=ids)]


def test_same_manifest_bytes_give_the_same_job(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        a, created_a = ledger.create_job(
            s, name="a", manifest_uri="m1", manifest_sha256="1" * 64, output_uri="/o"
        )
        b, created_b = ledger.create_job(
            s, name="b", manifest_uri="m2", manifest_sha256="1" * 64, output_uri="/o"
        )
        c, created_c = ledger.create_job(
            s, name="c", manifest_uri="m1", manifest_sha256="2" * 64, output_uri="/o"
        )
    assert (a == b, created_a, created_b, c != a, created_c) == (True, True, False, True, True)


def test_add_items_returns_pending_and_records_events(sessions: sessionmaker[Session]) -> None:
    job_id, pending = new_job(sessions)
    assert len(pending) == 3
    with sessions.begin() as s:
        counts = ledger.item_counts(s, job_id=job_id)
        events = s.scalar(sa.select(sa.func.count()).select_from(ItemEvent))
    assert counts == {ItemStatus.PENDING: 3, ItemStatus.FAILED: 1}
    assert events == 4


def test_guarded_transitions(sessions: sessionmaker[Session]) -> None:
    _, ids = new_job(sessions)
    with sessions.begin() as s:
        with pytest.raises(ledger.IllegalTransition):
            ledger.transition(
                s, item_ids=ids, from_status=ItemStatus.PENDING, to_status=ItemStatus.SUCCEEDED
            )
        first = ledger.claim(
            s,
            item_ids=ids[:2],
            waiting=ItemStatus.PENDING,
            working=ItemStatus.EMBEDDING,
            worker="w1",
            lease_seconds=600,
        )
    with sessions.begin() as s:
        second = ledger.claim(
            s,
            item_ids=ids,
            waiting=ItemStatus.PENDING,
            working=ItemStatus.EMBEDDING,
            worker="w2",
            lease_seconds=600,
        )
    assert first == ids[:2] and second == ids[2:]  # a duplicate message gets nothing twice
    with sessions.begin() as s:
        moved = ledger.transition(
            s,
            item_ids=ids,
            from_status=ItemStatus.EMBEDDING,
            to_status=ItemStatus.READY,
            worker="w1",
        )
    assert moved == ids
    with sessions.begin() as s:
        attempts = [i.attempts for i in ledger.load_items(s, item_ids=ids)]
    assert attempts == [1, 1, 1]


def test_expired_lease_is_reclaimed(sessions: sessionmaker[Session]) -> None:
    _, ids = new_job(sessions, n_valid=1, n_invalid=0)
    with sessions.begin() as s:
        assert ledger.claim(
            s,
            item_ids=ids,
            waiting=ItemStatus.PENDING,
            working=ItemStatus.EMBEDDING,
            worker="dead",
            lease_seconds=0.05,
        )
    with sessions.begin() as s:  # lease still valid: nobody else may take it
        assert (
            ledger.claim(
                s,
                item_ids=ids,
                waiting=ItemStatus.PENDING,
                working=ItemStatus.EMBEDDING,
                worker="w2",
                lease_seconds=600,
            )
            == []
        )
    time.sleep(0.1)
    with sessions.begin() as s:
        assert (
            ledger.claim(
                s,
                item_ids=ids,
                waiting=ItemStatus.PENDING,
                working=ItemStatus.EMBEDDING,
                worker="w2",
                lease_seconds=600,
            )
            == ids
        )
        [item] = ledger.load_items(s, item_ids=ids)
        assert item.attempts == 2


def _to_running(sessions: sessionmaker[Session], ids: list[int]) -> None:
    with sessions.begin() as s:
        for waiting, working in ((ItemStatus.PENDING, ItemStatus.EMBEDDING),):
            ledger.claim(
                s, item_ids=ids, waiting=waiting, working=working, worker="w", lease_seconds=600
            )
        ledger.transition(
            s, item_ids=ids, from_status=ItemStatus.EMBEDDING, to_status=ItemStatus.READY
        )
        ledger.claim(
            s,
            item_ids=ids,
            waiting=ItemStatus.READY,
            working=ItemStatus.RUNNING,
            worker="w",
            lease_seconds=600,
        )


def test_complete_item_once_and_finalize(sessions: sessionmaker[Session]) -> None:
    job_id, ids = new_job(sessions, n_valid=2, n_invalid=1)
    _to_running(sessions, ids)
    out = [
        {
            "image_index": 0,
            "uri": "/o/a.png",
            "sha256": "0" * 64,
            "seed": 1,
            "width": 64,
            "height": 64,
        }
    ]
    with sessions.begin() as s:
        assert ledger.complete_item(s, item_id=ids[0], outputs=out, worker="w")
        assert ledger.finalize_job(s, job_id=job_id) is None  # manifest not fully read
    with sessions.begin() as s:  # a late duplicate changes nothing
        assert not ledger.complete_item(s, item_id=ids[0], outputs=out, worker="w2")
        ledger.mark_ingested(s, job_id=job_id, total_rows=3)
        assert ledger.finalize_job(s, job_id=job_id) is None  # ids[1] still running
        ledger.complete_item(s, item_id=ids[1], outputs=out, worker="w")
        assert ledger.finalize_job(s, job_id=job_id) == JobStatus.FAILED  # one invalid row
        assert ledger.finalize_job(s, job_id=job_id) is None  # only once
    with sessions.begin() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Output)) == 2
        progress = (
            s.execute(sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id})
            .mappings()
            .one()
        )
    assert (progress["total"], progress["succeeded"], progress["failed"]) == (3, 2, 1)
    assert float(progress["percent_done"]) == 100.0
    assert progress["status"] == "failed"


def test_job_progress_counts_in_flight(sessions: sessionmaker[Session]) -> None:
    job_id, ids = new_job(sessions, n_valid=4, n_invalid=0)
    with sessions.begin() as s:
        ledger.claim(
            s,
            item_ids=ids[:1],
            waiting=ItemStatus.PENDING,
            working=ItemStatus.EMBEDDING,
            worker="w",
            lease_seconds=60,
        )
        p = (
            s.execute(sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id})
            .mappings()
            .one()
        )
    assert (p["total"], p["pending"], p["running"], p["succeeded"]) == (4, 3, 1, 0)
    assert float(p["percent_done"]) == 0.0


def test_postgres_claims_skip_locked_rows(request: pytest.FixtureRequest) -> None:
    """Two workers claiming the same items at once on PostgreSQL get disjoint sets, and the
    second does not wait for the first's transaction."""
    url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    engine = ledger.make_engine(url)
    sessions = ledger.make_sessions(engine)
    _, ids = new_job(sessions, n_valid=4, n_invalid=0)
    first = sessions()
    try:
        first.begin()
        a = ledger.claim(
            first,
            item_ids=ids[:2],
            waiting=ItemStatus.PENDING,
            working=ItemStatus.EMBEDDING,
            worker="a",
            lease_seconds=60,
        )
        with sessions.begin() as second:  # first still holds its row locks
            second.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            b = ledger.claim(
                second,
                item_ids=ids,
                waiting=ItemStatus.PENDING,
                working=ItemStatus.EMBEDDING,
                worker="b",
                lease_seconds=60,
            )
        first.commit()
    finally:
        first.close()
        engine.dispose()
    assert a == ids[:2] and b == ids[2:]
