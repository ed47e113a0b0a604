"""The ledger on SQLite and PostgreSQL: guarded, fenced, idempotent, recorded. Time is a
ManualClock passed as `now=`: leases run out when a test says so."""

from __future__ import annotations

import functools
import random
import threading

import pytest
import sqlalchemy as sa
from helpers.clock import ManualClock
from sqlalchemy.orm import Session, sessionmaker

from storage.ledger import bulk, counters, db, items, job_claims, jobs
from storage.lifecycle import (
    EMBED,
    GENERATE,
    INGEST,
    ITEM_MOVES,
    STAGES,
    IllegalTransition,
)
from storage.migrate import upgrade
from storage.models import (
    Item,
    ItemEvent,
    ItemStatus,
    JobEvent,
    JobItemCount,
    JobStatus,
)

CLOCK = ManualClock()


def _finish_ingest(s: Session, *, job_id: str, token: str, total_rows: int, **when: object) -> bool:
    """The ingest's end of its claim: the manifest read, its row count recorded."""
    return job_claims.end(
        s,
        job_id=job_id,
        token=token,
        message=f"manifest read: {total_rows} rows",
        values={"total_rows": total_rows},
        **when,  # type: ignore[arg-type]
    )


def new_job(
    sessions: sessionmaker[Session], n_valid: int = 3, n_invalid: int = 1
) -> tuple[str, list[int]]:
    """A job being ingested (claimed by `ingest`), with its rows as items."""
    with sessions.begin() as s:
        job_id, created = jobs.create(
            s,
            name="j",
            manifest_uri="m.jsonl",
            manifest_sha256="ab" * 32,
            output_uri="/out",
            now=CLOCK(),
        )
        assert created
        assert job_claims.claim(
            s, job_id=job_id, stage=INGEST, worker="ingest", lease_seconds=60, now=CLOCK()
        )
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
        pending = bulk.add_items(s, job_id=job_id, rows=rows, now=CLOCK())
    return job_id, pending


def claim(s: Session, ids: list[int], stage=EMBED, worker: str = "w", lease: float = 600, **kw):  # type: ignore[no-untyped-def]
    return items.claim(
        s, item_ids=ids, stage=stage, worker=worker, lease_seconds=lease, now=CLOCK(), **kw
    )


def move(s: Session, ids: list[int], a: ItemStatus, b: ItemStatus, **kw) -> list[int]:  # type: ignore[no-untyped-def]
    return items.transition(s, item_ids=ids, from_status=a, to_status=b, now=CLOCK(), **kw)


def statuses(sessions: sessionmaker[Session], ids: list[int]) -> list[str]:
    with sessions.begin() as s:
        return [str(i.status) for i in items.load_items(s, item_ids=ids)]


def test_same_manifest_bytes_give_the_same_job(sessions: sessionmaker[Session]) -> None:
    create = functools.partial(jobs.create, output_uri="/o", now=CLOCK())
    with sessions.begin() as s:
        a, created_a = create(s, name="a", manifest_uri="m1", manifest_sha256="1" * 64)
        b, created_b = create(s, name="b", manifest_uri="m2", manifest_sha256="1" * 64)
        c, created_c = create(s, name="c", manifest_uri="m1", manifest_sha256="2" * 64)
    assert (a == b, created_a, created_b, c != a, created_c) == (True, True, False, True, True)


def test_add_items_returns_pending_and_records_events(sessions: sessionmaker[Session]) -> None:
    job_id, pending = new_job(sessions)
    assert len(pending) == 3
    with sessions.begin() as s:
        counts = counters.item_counts(s, job_id=job_id)
        events = s.scalar(sa.select(sa.func.count()).select_from(ItemEvent))
    assert counts == {ItemStatus.PENDING: 3, ItemStatus.FAILED: 1}
    assert events == 4


def test_add_items_round_trips_awkward_text(sessions: sessionmaker[Session]) -> None:
    """COPY on PostgreSQL must escape what its text format treats specially."""
    awkward = 'tab\there\nnewline \\N back\\slash "quote" \u00e9\u6f22 \\.'
    params = {"prompt": awkward, "nested": {"list": [1, 2.5, None, True]}, "empty": ""}
    with sessions.begin() as s:
        job_id, _ = jobs.create(
            s, name="j", manifest_uri="m", manifest_sha256="cd" * 32, output_uri="/o", now=CLOCK()
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
        pending = bulk.add_items(s, job_id=job_id, rows=rows, now=CLOCK())
        more = bulk.add_items(
            s,
            job_id=job_id,
            rows=[{"row_id": "b", "row_index": 2, "status": ItemStatus.PENDING, "params": {}}],
            now=CLOCK(),
        )
    assert len(pending) == 1 and len(more) == 1 and more[0] > pending[0]
    with sessions.begin() as s:
        got = {i.row_index: i for i in s.scalars(sa.select(Item).where(Item.job_id == job_id))}
        messages = [e.message for e in s.scalars(sa.select(ItemEvent).order_by(ItemEvent.id))]
    assert got[0].id == pending[0] and got[0].params == params
    assert got[0].row_id == "a" and got[0].error_message is None
    assert got[1].row_id is None and got[1].error_message == awkward
    assert got[1].status == ItemStatus.FAILED and got[1].updated_at.tzinfo is not None
    assert messages == [None, awkward, None]


def test_guarded_transitions(sessions: sessionmaker[Session]) -> None:
    _, ids = new_job(sessions)
    with sessions.begin() as s:
        with pytest.raises(IllegalTransition):
            move(s, ids, ItemStatus.PENDING, ItemStatus.SUCCEEDED)
        first = claim(s, ids[:2], worker="w1")
    with sessions.begin() as s:
        second = claim(s, ids, worker="w2")
    assert first.ids == ids[:2] and second.ids == ids[2:]  # a duplicate gets nothing twice
    with sessions.begin() as s:
        moved = move(s, ids[:2], EMBED.working, EMBED.next, token=first.token)
        moved += move(s, ids[2:], EMBED.working, EMBED.next, token=second.token)
    assert moved == ids
    with sessions.begin() as s:
        attempts = [i.attempts for i in items.load_items(s, item_ids=ids)]
        tokens = [i.lease_token for i in items.load_items(s, item_ids=ids)]
    assert attempts == [0, 0, 0]  # claims are counted per stage: ready starts afresh
    assert tokens == [None, None, None]  # a claim ends with the move out of its stage


def test_writes_carry_the_claim_token(sessions: sessionmaker[Session]) -> None:
    """Fencing: a worker whose lease lapsed and was taken over cannot release, fail, renew or
    finish the items: every write with its old token changes nothing."""
    _, ids = new_job(sessions, n_valid=2, n_invalid=0)
    with sessions.begin() as s:
        stale = claim(s, ids, worker="paused", lease=5)
    CLOCK.advance(6)
    with sessions.begin() as s:
        fresh = claim(s, ids, worker="alive", lease=60)
    assert fresh.ids == ids
    with sessions.begin() as s:
        assert (
            move(s, ids, EMBED.working, EMBED.waiting, token=stale.token, refund_attempt=True) == []
        )
        assert (
            move(s, ids, EMBED.working, ItemStatus.FAILED, token=stale.token, error_code="x") == []
        )
        assert move(s, ids, EMBED.working, EMBED.next, token=stale.token) == []
        assert (
            items.extend_leases(
                s,
                item_ids=ids,
                working=EMBED.working,
                token=stale.token,
                lease_seconds=60,
                now=CLOCK(),
            )
            == []
        )
        assert items.still_held(s, item_ids=ids, working=EMBED.working, token=stale.token) == []
        assert items.still_held(s, item_ids=ids, working=EMBED.working, token=fresh.token) == ids
        [a, b] = items.load_items(s, item_ids=ids)
    assert (a.status, a.attempts, a.lease_token) == (EMBED.working, 2, fresh.token)
    with sessions.begin() as s:
        assert move(s, ids, EMBED.working, EMBED.next, token=fresh.token) == ids


def _to_running(sessions: sessionmaker[Session], ids: list[int]) -> str:
    with sessions.begin() as s:
        embedding = claim(s, ids)
        move(s, ids, EMBED.working, EMBED.next, token=embedding.token)
        return claim(s, ids, stage=GENERATE).token


def test_finish_once_and_finalize(sessions: sessionmaker[Session]) -> None:
    job_id, ids = new_job(sessions, n_valid=2, n_invalid=1)
    token = _to_running(sessions, ids)
    with sessions.begin() as s:
        assert move(s, ids[:1], GENERATE.working, GENERATE.next, token=token) == ids[:1]
        assert jobs.finalize(s, job_id=job_id, now=CLOCK()) is None  # manifest not fully read
    with sessions.begin() as s:  # a late duplicate changes nothing
        assert move(s, ids[:1], GENERATE.working, GENERATE.next, token=token) == []
        assert (
            _finish_ingest(
                s, job_id=job_id, token="not-the-ingest's", total_rows=3, now=CLOCK(), worker="x"
            )
            is False
        )
        ingest_token = s.scalar(
            sa.text("SELECT lease_token FROM jobs WHERE id = :j"), {"j": job_id}
        )
        assert _finish_ingest(
            s, job_id=job_id, token=ingest_token, total_rows=3, now=CLOCK(), worker="ingest"
        )
        assert jobs.finalize(s, job_id=job_id, now=CLOCK()) is None  # ids[1] still running
        move(s, ids[1:], GENERATE.working, GENERATE.next, token=token)
        assert jobs.finalize(s, job_id=job_id, now=CLOCK()) == JobStatus.PARTIAL  # an invalid row
        assert jobs.finalize(s, job_id=job_id, now=CLOCK()) is None  # only once
    with sessions.begin() as s:
        progress = (
            s.execute(sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id})
            .mappings()
            .one()
        )
        history = s.execute(
            sa.select(JobEvent.from_status, JobEvent.to_status, JobEvent.message)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    assert (progress["total"], progress["succeeded"], progress["failed"]) == (3, 2, 1)
    assert float(progress["percent_done"]) == 100.0 and progress["status"] == "partial"
    assert [tuple(h) for h in history] == [
        (None, "pending", "registered"),
        ("pending", "running", "ingest started"),
        ("running", "running", "manifest read: 3 rows"),
        ("running", "partial", "every item ended"),
    ]


def test_job_progress_columns_follow_the_stage_table(sessions: sessionmaker[Session]) -> None:
    """`pending` counts the items waiting for any stage, `running` those a stage holds."""
    job_id, ids = new_job(sessions, n_valid=6, n_invalid=0)
    with sessions.begin() as s:
        embedding = claim(s, ids[:4])
        move(s, ids[:3], EMBED.working, EMBED.next, token=embedding.token)
        running = claim(s, ids[:2], stage=GENERATE)
        move(s, ids[:1], GENERATE.working, GENERATE.next, token=running.token)
        counts = {str(k): v for k, v in counters.item_counts(s, job_id=job_id).items()}
    with sessions.begin() as s:
        p = (
            s.execute(sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id})
            .mappings()
            .one()
        )
    assert counts == {"pending": 2, "embedding": 1, "ready": 1, "running": 1, "succeeded": 1}
    assert p["pending"] == sum(counts.get(str(stage.waiting), 0) for stage in STAGES) == 3
    assert p["running"] == sum(counts.get(str(stage.working), 0) for stage in STAGES) == 2
    assert (p["total"], p["succeeded"]) == (6, 1)


def test_postgres_claims_skip_locked_rows(fresh_pg_url: str) -> None:
    """Two workers claiming the same items at once on PostgreSQL get disjoint sets, and the
    second does not wait for the first's transaction."""
    upgrade(fresh_pg_url)
    engine = db.make_engine(fresh_pg_url)
    sessions = db.make_sessions(engine)
    _, ids = new_job(sessions, n_valid=4, n_invalid=0)
    first = sessions()
    try:
        first.begin()
        a = claim(first, ids[:2], worker="a")
        with sessions.begin() as second:  # first still holds its row locks
            second.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            b = claim(second, ids, worker="b")
        first.commit()
    finally:
        first.close()
        engine.dispose()
    assert a.ids == ids[:2] and b.ids == ids[2:]


def _true_counts(s: Session, job_id: str) -> dict[ItemStatus, int]:
    rows = s.execute(
        sa.select(Item.status, sa.func.count()).where(Item.job_id == job_id).group_by(Item.status)
    )
    return {ItemStatus(status): n for status, n in rows}


def test_status_counters_follow_every_transition(sessions: sessionmaker[Session]) -> None:
    """job_item_counts (behind job_progress and finalize) equals a real count of the items
    after random moves, re-claims, a rolled-back transaction and a retry."""
    job_id, ids = new_job(sessions, n_valid=60, n_invalid=5)
    rng = random.Random(7)
    for _ in range(40):
        CLOCK.advance(1000)  # every lease lapsed: self-moves apply too
        with sessions.begin() as s:
            current = {i.id: i.status for i in items.load_items(s, item_ids=ids)}
            start = rng.choice(sorted(set(current.values())))
            targets = sorted(ITEM_MOVES[start])
            if not targets:
                continue
            chosen = [i for i, st in current.items() if st == start]
            move(s, rng.sample(chosen, k=rng.randint(1, len(chosen))), start, rng.choice(targets))
            assert counters.item_counts(s, job_id=job_id) == _true_counts(s, job_id)
    with pytest.raises(RuntimeError), sessions.begin() as s:
        move(s, ids, ItemStatus.PENDING, ItemStatus.CANCELLED)
        raise RuntimeError("rolled back: the counters must not move either")
    with sessions.begin() as s:
        truth = _true_counts(s, job_id)
        assert counters.item_counts(s, job_id=job_id) == truth
        view = s.execute(sa.text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id})
        p = view.mappings().one()
    assert p["total"] == 65 and p["failed"] == truth.get(ItemStatus.FAILED, 0)
    assert p["pending"] == truth.get(ItemStatus.PENDING, 0) + truth.get(ItemStatus.READY, 0)
    with sessions.begin() as s:  # the repair tool rebuilds the same numbers
        s.execute(sa.delete(JobItemCount))
        assert counters.recount(s, job_id=job_id) == truth
    with sessions.begin() as s:
        assert counters.item_counts(s, job_id=job_id) == truth


def test_postgres_counters_under_concurrent_workers(fresh_pg_url: str) -> None:
    """Four threads move items of one job through every stage at once, each transaction
    touching several counter rows in different orders: no deadlock, exact counts."""
    upgrade(fresh_pg_url)
    engine = db.make_engine(fresh_pg_url)
    sessions = db.make_sessions(engine)
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
                        moved = move(s, batch, a, b)
                        if b == ItemStatus.READY:  # fail one of the batch on the way
                            move(
                                s,
                                moved[:1],
                                ItemStatus.READY,
                                ItemStatus.FAILED,
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
            assert counters.item_counts(s, job_id=job_id) == _true_counts(s, job_id)
            assert counters.item_counts(s, job_id=job_id) == {
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
    got = []
    for n in range(4):
        with sessions.begin() as s:
            got.append(claim(s, ids[:1], worker=f"w{n}", lease=5, max_attempts=3).ids)
        CLOCK.advance(6)  # ... and the worker dies: the lease runs out
    assert got == [ids[:1], ids[:1], ids[:1], []]
    with sessions.begin() as s:
        [item, other] = items.load_items(s, item_ids=ids)
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
        held = claim(s, ids[:2], worker="w1", lease=10)
    CLOCK.advance(4)
    with sessions.begin() as s:
        elsewhere, wait = items.held_elsewhere(s, item_ids=ids, working=EMBED.working, now=CLOCK())
        assert elsewhere == ids[:2] and wait == pytest.approx(6)
        # the heartbeat keeps the first one; the second one's worker died
        kept = items.extend_leases(
            s,
            item_ids=ids[:1],
            working=EMBED.working,
            token=held.token,
            lease_seconds=60,
            now=CLOCK(),
        )
        assert kept == ids[:1]
        assert (
            items.extend_leases(
                s,
                item_ids=ids[2:],
                working=EMBED.working,
                token=held.token,
                lease_seconds=60,
                now=CLOCK(),
            )
            == []
        )  # not claimed: nothing to renew
    CLOCK.advance(7)
    with sessions.begin() as s:
        assert items.expired_leases(s, working=EMBED.working, now=CLOCK()) == ids[1:2]
        elsewhere, wait = items.held_elsewhere(s, item_ids=ids, working=EMBED.working, now=CLOCK())
        assert elsewhere == ids[:1] and wait == pytest.approx(53)


def test_the_ingest_claims_its_job(sessions: sessionmaker[Session]) -> None:
    """One ingest at a time: a second one gets nothing while the first's lease lives, takes
    over once it ran out (the first is fenced off), resumes after a release; a job whose
    manifest was read is not ingested again."""
    with sessions.begin() as s:
        job_id, _ = jobs.create(
            s, name="j", manifest_uri="m", manifest_sha256="9" * 64, output_uri="/o", now=CLOCK()
        )
        job = jobs.get(s, job_id=job_id)
        assert job is not None and job_claims.waits(job, now=CLOCK())
    take = functools.partial(job_claims.claim, job_id=job_id, stage=INGEST, lease_seconds=10)
    hold = functools.partial(job_claims.hold, job_id=job_id, lease_seconds=10)
    with sessions.begin() as s:
        first = take(s, worker="a", now=CLOCK())
        assert first and take(s, worker="b", now=CLOCK()) is None
        assert not job_claims.waits(jobs.get(s, job_id=job_id), now=CLOCK())  # type: ignore[arg-type]
    CLOCK.advance(11)
    with sessions.begin() as s:
        assert job_claims.expired(s, stage=INGEST, now=CLOCK()) == [job_id]
        second = take(s, worker="b", now=CLOCK())
        assert second and second != first
        assert hold(s, token=first, now=CLOCK()) is None  # fenced off
        assert hold(s, token=second, now=CLOCK()) == JobStatus.RUNNING
        assert job_claims.end(
            s, job_id=job_id, token=second, now=CLOCK(), worker="b", message="outage"
        )
        assert job_claims.waits(jobs.get(s, job_id=job_id), now=CLOCK())  # type: ignore[arg-type]
        third = take(s, worker="c", now=CLOCK())
        assert third and _finish_ingest(
            s, job_id=job_id, token=third, total_rows=0, now=CLOCK(), worker="c"
        )
        assert take(s, worker="d", now=CLOCK()) is None  # read already
        assert not job_claims.waits(jobs.get(s, job_id=job_id), now=CLOCK())  # type: ignore[arg-type]


def test_jobs_waiting_for_ingest_are_requeued_once_per_period(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        job_id, _ = jobs.create(
            s, name="j", manifest_uri="m", manifest_sha256="8" * 64, output_uri="/o", now=CLOCK()
        )
    requeue = functools.partial(
        job_claims.requeue, job_id=job_id, worker="reaper", message="lost", idle_seconds=60
    )
    with sessions.begin() as s:
        assert job_claims.stale_waiting(s, idle_seconds=60, now=CLOCK(), stage=INGEST) == []
        assert not requeue(s, now=CLOCK())
    CLOCK.advance(61)
    with sessions.begin() as s:
        assert job_claims.stale_waiting(s, idle_seconds=60, now=CLOCK(), stage=INGEST) == [job_id]
        assert requeue(s, now=CLOCK())
        assert not requeue(s, now=CLOCK())  # once per period
        assert job_claims.stale_waiting(s, idle_seconds=60, now=CLOCK(), stage=INGEST) == []
        events = s.scalars(sa.select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    assert events == ["registered", "lost"]
