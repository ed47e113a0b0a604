"""A stage's claim with turns, at 1,000,000 waiting items: milliseconds, as before turns.

    .venv/bin/python bench/turns.py [--items 1000000] [--history 10000] [--pg postgresql+psycopg://...]

Creates a throwaway PostgreSQL database with the ledger of a busy night: `--history` ended
jobs (each with its status counters, as the ledger keeps them), one running job of `--items`
items waiting for the generate stage, and two running 8-item jobs of the same level. Then
times, each in a transaction rolled back (the ledger is the same for every run):

- the claim as it was before turns: `items.claim` of a message's 8 ids;
- `items.next_turn` for a message of the large job when it is its own turn (the other jobs
  had theirs more recently): the message's items, the job, nothing else read;
- `next_turn` when it is another job's turn: the job, then its first 8 waiting items from
  the (job_id, status, id) index, locked;
- the whole claim with turns, as `workers.claims.claimed` runs it: `next_turn`, `claim`,
  `served`, on the message's own turn and on another job's.

each right after the items were written (no statistics yet: the state in the middle of a
night) and again after VACUUM ANALYZE. Prints the median and p95 of 50 runs. No assertions.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.benchdb import throwaway_database  # noqa: E402


def timed(sessions: sa.orm.sessionmaker, work: Callable, runs: int = 50) -> tuple[float, float]:  # type: ignore[type-arg]
    times = []
    for i in range(runs + 5):
        session = sessions()
        try:
            start = time.perf_counter()
            work(session)
            elapsed = (time.perf_counter() - start) * 1000
        finally:
            session.rollback()
            session.close()
        if i >= 5:  # the first few warm the connection and the caches
            times.append(elapsed)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=10_000, help="ended jobs in the ledger")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    from core.clock import utcnow
    from storage.ledger import bulk, counters, db, items, job_claims, jobs
    from storage.lifecycle import GENERATE, INGEST
    from storage.migrate import upgrade
    from storage.models import Item, ItemStatus, Job, JobItemCount, JobStatus

    url, drop = throwaway_database(args.pg)
    engine = db.make_engine(url)
    now = utcnow()
    try:
        upgrade(url)
        sessions = db.make_sessions(engine)
        start = time.perf_counter()
        # 1. the history: ended jobs and their counters
        with sessions.begin() as s:
            old = [
                {
                    "id": uuid.uuid4().hex,
                    "name": "old",
                    "kind": "generate",
                    "manifest_uri": "m",
                    "manifest_sha256": uuid.uuid4().hex * 2,
                    "output_uri": "o",
                    "status": JobStatus.SUCCEEDED,
                    "created_at": now - timedelta(days=1),
                    "updated_at": now,
                }
                for _ in range(args.history)
            ]
            s.execute(sa.insert(Job), old)
            s.execute(
                sa.insert(JobItemCount),
                [
                    {"job_id": j["id"], "status": st, "n": n}
                    for j in old
                    for st, n in (("succeeded", 100), ("ready", 0), ("pending", 0))
                ],
            )

        # 2. tonight's jobs: a large one and two small ones of the same level, items ready
        def running(rows: int, created: float) -> tuple[str, list[int]]:
            """A running job of `rows` ready items; its id and its last 8 items."""
            with sessions.begin() as s:
                job_id, _ = jobs.create(
                    s,
                    name="bench",
                    manifest_uri="m",
                    manifest_sha256=uuid.uuid4().hex * 2,
                    output_uri="o",
                    now=now + timedelta(seconds=created),
                )
                job_claims.claim(
                    s, job_id=job_id, stage=INGEST, worker="b", lease_seconds=3600, now=now
                )
            for lo in range(0, rows, 50_000):
                values = [
                    {"row_id": f"r{i}", "row_index": i, "status": ItemStatus.READY, "params": {}}
                    for i in range(lo, min(lo + 50_000, rows))
                ]
                with sessions.begin() as s:
                    bulk.add_items(s, job_id=job_id, rows=values, now=now)
            with sessions.begin() as s:
                counters.recount(s, job_id=job_id)
                last = s.scalars(
                    sa.select(Item.id)
                    .where(Item.job_id == job_id)
                    .order_by(Item.id.desc())
                    .limit(8)
                )
                return job_id, sorted(last)

        large, message = running(args.items, 0)  # its last message: all its items wait
        small_a, _ = running(8, 1)
        small_b, _ = running(8, 2)
        written = time.perf_counter() - start
        print(
            f"{args.history:,} ended jobs, a running job of {args.items:,} ready items and two of"
            f" 8 written in {written:.1f} s"
        )

        def mark_served(job_ids: list[str], at: timedelta) -> None:
            with sessions.begin() as s:
                for job_id in job_ids:
                    items.served(s, job_id=job_id, stage=GENERATE, now=now + at)

        def claim_by_ids(s: sa.orm.Session) -> None:
            got = items.claim(
                s, item_ids=message, stage=GENERATE, worker="b", lease_seconds=600, now=now
            )
            assert got.ids == message

        def own_turn(s: sa.orm.Session) -> None:
            assert items.next_turn(s, stage=GENERATE, item_ids=message).job_id == large

        def other_turn(s: sa.orm.Session) -> None:
            assert items.next_turn(s, stage=GENERATE, item_ids=message).job_id == small_a

        def whole_claim(s: sa.orm.Session, whose: str) -> None:
            turn = items.next_turn(s, stage=GENERATE, item_ids=message)
            got = items.claim(
                s, item_ids=turn.ids, stage=GENERATE, worker="b", lease_seconds=600, now=now
            )
            assert turn.job_id == whose and got.ids == turn.ids
            items.served(s, job_id=whose, stage=GENERATE, now=now)

        cases = {
            "claim by the message's ids (before turns)": (claim_by_ids, None),
            "next_turn: the message's own job": (own_turn, "large last"),
            "next_turn: another job's turn": (other_turn, "small first"),
            "next_turn + claim + served (its own)": (
                functools.partial(whole_claim, whose=large),
                "large last",
            ),
            "next_turn + claim + served (another's)": (
                functools.partial(whole_claim, whose=small_a),
                "small first",
            ),
        }
        results: dict[str, dict[str, tuple[float, float]]] = {}
        for phase in ("as written", "after VACUUM"):
            if phase == "after VACUUM":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("VACUUM ANALYZE"))
            for label, (work, order) in cases.items():
                if order == "large last":  # the small jobs had their turns more recently
                    mark_served([large], timedelta(0))
                    mark_served([small_a, small_b], timedelta(seconds=1))
                elif order == "small first":  # the large job had the last turn
                    mark_served([small_a, small_b], timedelta(0))
                    mark_served([large], timedelta(seconds=1))
                results.setdefault(label, {})[phase] = timed(sessions, work)
    finally:
        engine.dispose()
        drop()

    print()
    print(f"{'claim of an 8-item message':<44}{'as written ms (median / p95)':>30}", end="")
    print(f"{'after VACUUM ms':>22}")
    for label, phases in results.items():
        cells = [f"{m:7.2f} / {p:7.2f}" for m, p in (phases["as written"], phases["after VACUUM"])]
        print(f"{label:<44}{cells[0]:>30}{cells[1]:>22}")
    before = results["claim by the message's ids (before turns)"]["after VACUUM"][0]
    after = results["next_turn + claim + served (another's)"]["after VACUUM"][0]
    print(f"\nthe whole claim with turns vs by ids (after VACUUM): {after / before:.1f}x the time")


if __name__ == "__main__":
    main()
