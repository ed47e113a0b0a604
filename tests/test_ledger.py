"""Ledger transitions on SQLite and PostgreSQL: guarded, idempotent, recorded."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger
from storage.migrate import upgrade
from storage.models import Item, ItemEvent, ItemStatus, JobItemCount, JobStatus, Output


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


def test_add_items_round_trips_awkward_text(sessions: sessionmaker[Session]) -> None:
    """COPY on PostgreSQL must escape what its text format treats specially."""
    awkward = 'tab\there\nnewline \\N back\\slash "quote" \u00e9\u6f22 \\.'
    params = {"prompt": awkward, "nested": {"list": [1, 2.5, None, True]}, "empty": ""}
    with sessions.begin() as s:
        job_id, _ = ledger.create_job(
            s, name="j", manifest_uri="m", manifest_sha256="cd" * 32, output_uri="/o"
        )
        rows = [
            {"row_id": "a", "row_index": 0, "status": ItemStatus.PENDING, "params": params},
            {
                "row_id": None,
                "row_index": 1,
                "status": ItemStatus.FAILED,
                "error_code": "invalid_row",
                "error_message": awkward,
            },
        ]
        pending = ledger.add_items(s, job_id=job_id, rows=rows)
        more = ledger.add_items(
            s,
            job_id=job_id,
            rows=[{"row_id": "b", "row_index": 2, "status": ItemStatus.PENDING, "params": {}}],
        )
    assert len(pending) == 1 and len(more) == 1 and more[0] > pending[0]
    with sessions.begin() as s:
        items = {i.row_index: i for i in s.scalars(sa.select(Item).where(Item.job_id == job_id))}
        messages = [e.message for e in s.scalars(sa.select(ItemEvent).order_by(ItemEvent.id))]
    assert items[0].id == pending[0] and items[0].params == params
    assert items[0].row_id == "a" and items[0].error_message is None
    assert items[1].row_id is None and items[1].error_message == awkward
    assert items[1].status == ItemStatus.FAILED and items[1].updated_at.tzinfo is not None
    assert messages == [None, awkward, None]


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
    assert attempts == [0, 0, 0]  # claims are counted per stage: ready starts afresh


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
    with sessions.begin() as s:  # what a user sees from another connection once committed
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


def _true_counts(s: Session, job_id: str) -> dict[ItemStatus, int]:
    rows = s.execute(
        sa.select(Item.status, sa.func.count()).where(Item.job_id == job_id).group_by(Item.status)
    )
    return {ItemStatus(status): n for status, n in rows}


def test_status_counters_follow_every_transition(sessions: sessionmaker[Session]) -> None:
    """job_item_counts (behind job_progress and finalize_job) equals a real count of the items
    after random moves, re-claims, a rolled-back transaction and a retry."""
    import random

    job_id, ids = new_job(sessions, n_valid=60, n_invalid=5)
    rng = random.Random(7)
    for _ in range(40):
        with sessions.begin() as s:
            current = {i.id: i.status for i in ledger.load_items(s, item_ids=ids)}
            start = rng.choice(sorted(set(current.values())))
            targets = sorted(ledger.ALLOWED[start])
            if not targets:
                continue
            chosen = [i for i, st in current.items() if st == start]
            ledger.transition(
                s,
                item_ids=rng.sample(chosen, k=rng.randint(1, len(chosen))),
                from_status=start,
                to_status=rng.choice(targets),
            )
            assert ledger.item_counts(s, job_id=job_id) == _true_counts(s, job_id)
    with pytest.raises(RuntimeError), sessions.begin() as s:
        ledger.transition(
            s, item_ids=ids, from_status=ItemStatus.PENDING, to_status=ItemStatus.CANCELLED
        )
        raise RuntimeError("rolled back: the counters must not move either")
    with sessions.begin() as s:
        truth = _true_counts(s, job_id)
        assert ledger.item_counts(s, job_id=job_id) == truth
        view = s.execute(sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id})
        p = view.mappings().one()
    assert p["total"] == 65 and p["failed"] == truth.get(ItemStatus.FAILED, 0)
    assert p["pending"] == truth.get(ItemStatus.PENDING, 0) + truth.get(ItemStatus.READY, 0)
    with sessions.begin() as s:  # the repair tool rebuilds the same numbers
        s.execute(sa.delete(JobItemCount))
        assert ledger.recount(s, job_id=job_id) == truth
    with sessions.begin() as s:
        assert ledger.item_counts(s, job_id=job_id) == truth


def test_postgres_counters_under_concurrent_workers(request: pytest.FixtureRequest) -> None:
    """Four threads move items of one job through every stage at once, each transaction
    touching several counter rows in different orders: no deadlock, exact counts."""
    import threading

    url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    engine = ledger.make_engine(url)
    sessions = ledger.make_sessions(engine)
    job_id, ids = new_job(sessions, n_valid=400, n_invalid=0)
    errors: list[BaseException] = []
    steps = [
        (ItemStatus.PENDING, ItemStatus.EMBEDDING),
        (ItemStatus.EMBEDDING, ItemStatus.READY),
        (ItemStatus.READY, ItemStatus.RUNNING),
        (ItemStatus.RUNNING, ItemStatus.SUCCEEDED),
    ]

    def work(mine: list[int]) -> None:
        try:
            for k in range(0, len(mine), 10):
                batch = mine[k : k + 10]
                for a, b in steps:
                    with sessions.begin() as s:
                        moved = ledger.transition(s, item_ids=batch, from_status=a, to_status=b)
                        if b == ItemStatus.READY:  # fail one of the batch on the way
                            ledger.transition(
                                s,
                                item_ids=moved[:1],
                                from_status=ItemStatus.READY,
                                to_status=ItemStatus.FAILED,
                                error_code="no_face",
                            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(ids[n::4],)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert errors == []
        with sessions.begin() as s:
            assert ledger.item_counts(s, job_id=job_id) == _true_counts(s, job_id)
            assert ledger.item_counts(s, job_id=job_id) == {
                ItemStatus.SUCCEEDED: 360,
                ItemStatus.FAILED: 40,
            }
    finally:
        engine.dispose()


def test_an_item_delivered_too_often_fails_with_its_history(
    sessions: sessionmaker[Session],
) -> None:
    """A poison item whose worker dies every time: after `max_attempts` claims of one stage
    it fails as internal instead of looping; item_events shows every delivery."""
    _, ids = new_job(sessions, n_valid=2, n_invalid=0)
    claim = {"waiting": ItemStatus.PENDING, "working": ItemStatus.EMBEDDING, "max_attempts": 3}
    got = []
    for n in range(4):
        with sessions.begin() as s:
            got.append(
                ledger.claim(s, item_ids=ids[:1], worker=f"w{n}", lease_seconds=0.01, **claim)
            )
        time.sleep(0.05)  # ... and the worker dies: the lease runs out
    assert got == [ids[:1], ids[:1], ids[:1], []]
    with sessions.begin() as s:
        [item, other] = ledger.load_items(s, item_ids=ids)
        events = s.execute(
            sa.select(ItemEvent.to_status, ItemEvent.worker)
            .where(ItemEvent.item_id == ids[0])
            .order_by(ItemEvent.id)
        ).all()
    assert (item.status, item.error_code, item.attempts) == (ItemStatus.FAILED, "internal", 4)
    assert item.error_message is not None and "more than 3 times" in item.error_message
    assert [e.to_status for e in events] == ["pending"] + ["embedding"] * 4 + ["failed"]
    assert [e.worker for e in events[1:5]] == ["w0", "w1", "w2", "w3"]
    assert other.status == ItemStatus.PENDING  # untouched


def test_heartbeat_held_items_and_expired_leases(sessions: sessionmaker[Session]) -> None:
    _, ids = new_job(sessions, n_valid=3, n_invalid=0)
    with sessions.begin() as s:
        ledger.claim(
            s,
            item_ids=ids[:2],
            waiting=ItemStatus.PENDING,
            working=ItemStatus.EMBEDDING,
            worker="w1",
            lease_seconds=0.5,
        )
    with sessions.begin() as s:
        held, wait = ledger.held_elsewhere(s, item_ids=ids, working=ItemStatus.EMBEDDING)
        assert held == ids[:2] and 0 < wait <= 0.5
        # the heartbeat keeps the first one; the second one's worker died
        assert (
            ledger.extend_leases(
                s, item_ids=ids[:1], working=ItemStatus.EMBEDDING, lease_seconds=60
            )
            == 1
        )
        assert (
            ledger.extend_leases(
                s, item_ids=ids[2:], working=ItemStatus.EMBEDDING, lease_seconds=60
            )
            == 0
        )  # not claimed: nothing to renew
    time.sleep(0.6)
    with sessions.begin() as s:
        assert ledger.expired_leases(s, working=ItemStatus.EMBEDDING) == ids[1:2]
        held, wait = ledger.held_elsewhere(s, item_ids=ids, working=ItemStatus.EMBEDDING)
        assert held == ids[:1] and 50 < wait <= 60
