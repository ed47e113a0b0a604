"""Status queries on a job of a million items: milliseconds.

    .venv/bin/python bench/status.py [--items 1000000] [--pg postgresql+psycopg://...]

Creates a throwaway PostgreSQL database, writes one job of N items through `bulk.add_items`
(COPY), gives them a mid-job mix of statuses (60% succeeded, 2% failed, 5% running, 33%
pending) with bulk UPDATEs and rebuilds the status counters from the items
(`counters.recount`; the counters' upkeep on every transition is tested in
tests/integration/test_ledger.py), then times, as a user's SQL client would run them:

- `job_progress` for that job (reads the per-job status counters),
- `job_progress` for every job,
- a per-status count on `items` (the (job_id, status) index),
- the same progress computed by counting the items (revision 0001's view), for comparison,

each right after the updates (dead tuples, no visibility map: the state in the middle of a job)
and again after VACUUM ANALYZE. Prints the median and p95 of 30 runs. No assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import sqlalchemy as sa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.benchdb import throwaway_database  # noqa: E402

COUNTING_ITEMS = """
SELECT j.id, COUNT(i.id) AS total,
       SUM(CASE WHEN i.status IN ('pending', 'ready') THEN 1 ELSE 0 END) AS pending,
       SUM(CASE WHEN i.status IN ('embedding', 'running') THEN 1 ELSE 0 END) AS running,
       SUM(CASE WHEN i.status = 'succeeded' THEN 1 ELSE 0 END) AS succeeded,
       SUM(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END) AS failed
FROM jobs j LEFT JOIN items i ON i.job_id = j.id
WHERE j.id = :job
GROUP BY j.id
"""
QUERIES = {
    "job_progress, one job": "SELECT * FROM job_progress WHERE job_id = :job",
    "job_progress, all jobs": "SELECT * FROM job_progress",
    "count of failed items": (
        "SELECT COUNT(*) FROM items WHERE job_id = :job AND status = 'failed'"
    ),
    "progress by counting items": COUNTING_ITEMS,
}


def timed(conn: sa.Connection, sql: str, job_id: str, runs: int = 30) -> tuple[float, float]:
    statement = sa.text(sql)
    for _ in range(3):
        conn.execute(statement, {"job": job_id}).all()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        conn.execute(statement, {"job": job_id}).all()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    from core.clock import utcnow
    from storage.ledger import bulk, counters, db, job_claims, jobs
    from storage.lifecycle import INGEST
    from storage.migrate import upgrade
    from storage.models import ItemStatus

    url, drop = throwaway_database(args.pg)
    engine = db.make_engine(url)
    try:
        upgrade(url)
        sessions = db.make_sessions(engine)
        start = time.perf_counter()
        with sessions.begin() as s:
            job_id, _ = jobs.create(
                s,
                name="bench",
                manifest_uri="m",
                manifest_sha256="0" * 64,
                output_uri="o",
                now=utcnow(),
            )
            job_claims.claim(
                s, job_id=job_id, stage=INGEST, worker="bench", lease_seconds=3600, now=utcnow()
            )
        for lo in range(0, args.items, 50_000):
            rows = [
                {
                    "row_id": f"row-{i}",
                    "row_index": i,
                    "status": ItemStatus.PENDING,
                    "params": {"id": f"row-{i}", "prompt": "a product", "reference": "r.png"},
                }
                for i in range(lo, min(lo + 50_000, args.items))
            ]
            with sessions.begin() as s:
                bulk.add_items(s, job_id=job_id, rows=rows, now=utcnow())
        added = time.perf_counter() - start
        with sessions.begin() as s:
            s.execute(
                sa.text(
                    "UPDATE items SET status = CAST(CASE WHEN row_index % 100 < 60 THEN "
                    "'succeeded' WHEN row_index % 100 < 62 THEN 'failed' WHEN row_index % 100 "
                    "< 67 THEN 'running' ELSE 'pending' END AS item_status) "
                    "WHERE job_id = :job AND row_index % 100 < 67"
                ),
                {"job": job_id},
            )
            counts = counters.recount(s, job_id=job_id)
        print(f"{args.items:,} items written with COPY in {added:.1f} s; statuses: ", end="")
        print(", ".join(f"{k.value} {v:,}" for k, v in sorted(counts.items())))

        results: dict[str, dict[str, tuple[float, float]]] = {}
        for phase in ("mid-job", "after VACUUM"):
            if phase == "after VACUUM":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("VACUUM ANALYZE"))
            with engine.connect() as conn:
                for label, sql in QUERIES.items():
                    results.setdefault(label, {})[phase] = timed(conn, sql, job_id)
    finally:
        engine.dispose()
        drop()

    print()
    print(f"{'query (one job of ' + format(args.items, ',') + ' items)':<44}", end="")
    print(f"{'mid-job ms (median / p95)':>28}{'after VACUUM ms':>22}")
    for label, phases in results.items():
        cells = [f"{m:8.2f} / {p:8.2f}" for m, p in (phases["mid-job"], phases["after VACUUM"])]
        print(f"{label:<44}{cells[0]:>28}{cells[1]:>22}")
    one = results["job_progress, one job"]["mid-job"][0]
    old = results["progress by counting items"]["mid-job"][0]
    print(f"\njob_progress vs counting the items (mid-job): {old / one:.0f}x faster")


if __name__ == "__main__":
    main()
