"""Whose turn a message is (`items.next_turn`), on SQLite and PostgreSQL: the highest priority
level first, then the job of that level that waited longest since its last turn in the stage;
the message's own unfinished items wait. The clock is a ManualClock: turns are ordered by the
times a test gives, never by how fast it runs."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from helpers.clock import ManualClock
from sqlalchemy.orm import Session, sessionmaker

from storage.ledger import bulk, db, items, job_claims, jobs
from storage.lifecycle import EMBED, GENERATE, INGEST
from storage.migrate import upgrade
from storage.models import ItemStatus

CLOCK = ManualClock()


def _job(sessions: sessionmaker[Session], rows: int, *, priority: int = 1) -> tuple[str, list[int]]:
    """A running job (its ingest holds it) with `rows` items waiting for the embed stage."""
    with sessions.begin() as s:
        job_id, _ = jobs.create(
            s,
            name="j",
            manifest_uri="m.jsonl",
            manifest_sha256=uuid.uuid4().hex * 2,
            output_uri="/out",
            now=CLOCK(),
            options=jobs.JobOptions(priority=priority),
        )
        job_claims.claim(s, job_id=job_id, stage=INGEST, worker="i", lease_seconds=60, now=CLOCK())
        values = [
            {"row_id": f"r{i}", "row_index": i, "status": ItemStatus.PENDING, "params": {}}
            for i in range(rows)
        ]
        ids = bulk.add_items(s, job_id=job_id, rows=values, now=CLOCK())
    CLOCK.advance(1)  # jobs created one after another
    return job_id, ids


def _take(sessions: sessionmaker[Session], message: list[int], stage=EMBED) -> items.Turn:  # type: ignore[no-untyped-def]
    """A worker's turn with `message`: whose it is, claimed and recorded as served."""
    with sessions.begin() as s:
        turn = items.next_turn(s, stage=stage, item_ids=message)
        claim = items.claim(
            s, item_ids=turn.ids, stage=stage, worker="w", lease_seconds=600, now=CLOCK()
        )
        assert claim.ids == turn.ids
        assert turn.job_id is not None
        items.served(s, job_id=turn.job_id, stage=stage, now=CLOCK())
    CLOCK.advance(1)
    return turn


def test_jobs_of_one_level_take_turns(sessions: sessionmaker[Session]) -> None:
    """A 2-item job behind a 12-item job of the same level: FIFO would serve it after six of
    the large job's messages; turns give it the second."""
    large, large_ids = _job(sessions, 12)
    small, small_ids = _job(sessions, 4)
    messages = [large_ids[i : i + 2] for i in range(0, 12, 2)]
    first = _take(sessions, messages[0])  # neither served yet: the older job goes first
    assert (first.job_id, first.ids, first.deferred) == (large, messages[0], [])
    second = _take(sessions, messages[1])  # the small job waited longer since its last turn
    assert (second.job_id, second.ids, second.deferred) == (small, small_ids[:2], messages[1])
    third = _take(sessions, messages[2])  # back to the large one, then the small one again
    assert (third.job_id, third.ids) == (large, messages[2])
    fourth = _take(sessions, messages[3])
    assert (fourth.job_id, fourth.ids) == (small, small_ids[2:])
    # the small job has nothing waiting now: every turn is the large job's own
    assert _take(sessions, messages[4]).ids == messages[4]
    # the small job's own messages come last: their items were taken on other turns, so
    # each settles its own items as before (held: nothing to claim), taking nobody's turn
    with sessions.begin() as s:
        late = items.next_turn(s, stage=EMBED, item_ids=small_ids[:2])
    assert (late.job_id, late.ids, late.deferred) == (small, small_ids[:2], [])


def test_a_higher_level_goes_first_and_ended_jobs_wait_for_nobody(
    sessions: sessionmaker[Session],
) -> None:
    normal, normal_ids = _job(sessions, 4)
    _take(sessions, normal_ids[:2])
    high, high_ids = _job(sessions, 2, priority=2)
    cancelled, _ = _job(sessions, 2, priority=2)
    with sessions.begin() as s:
        jobs.cancel(s, job_id=cancelled, now=CLOCK())
    turn = _take(sessions, normal_ids[2:])
    assert (turn.job_id, turn.ids, turn.deferred) == (high, high_ids, normal_ids[2:])
    # the high job's items are held now (embedding): nothing of it waits, the normal job's
    # message is its own turn again, even though its job was served more recently
    assert _take(sessions, normal_ids[2:]).ids == normal_ids[2:]


def test_turns_are_per_stage(sessions: sessionmaker[Session]) -> None:
    """A turn in the embed stage says nothing about the generate stage."""
    a, a_ids = _job(sessions, 2)
    b, b_ids = _job(sessions, 2)
    for ids in (a_ids, b_ids):
        _take(sessions, ids)
        with sessions.begin() as s:  # embedded
            items.transition(
                s,
                item_ids=ids,
                from_status=EMBED.working,
                to_status=EMBED.next,
                now=CLOCK(),
            )
    # b's generate message: a has waited as long as b in generate (never), and is older
    turn = _take(sessions, b_ids, stage=GENERATE)
    assert (turn.job_id, turn.ids, turn.deferred) == (a, a_ids, b_ids)


def test_postgres_workers_taking_the_same_turn_get_different_items(fresh_pg_url: str) -> None:
    """Two workers both giving their turn to the same job at once take different items of
    it (SKIP LOCKED), and the second does not wait for the first's transaction."""
    upgrade(fresh_pg_url)
    engine = db.make_engine(fresh_pg_url)
    sessions = db.make_sessions(engine)
    _, large_ids = _job(sessions, 6)
    _take(sessions, large_ids[:2])
    small, small_ids = _job(sessions, 4)
    first = sessions()
    try:
        first.begin()
        a = items.next_turn(first, stage=EMBED, item_ids=large_ids[2:4])
        with sessions.begin() as second:  # the first still holds its row locks
            second.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            b = items.next_turn(second, stage=EMBED, item_ids=large_ids[4:6])
        first.commit()
    finally:
        first.close()
        engine.dispose()
    assert (a.job_id, a.ids, b.job_id, b.ids) == (small, small_ids[:2], small, small_ids[2:])
