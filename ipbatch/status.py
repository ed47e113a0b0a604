"""`ipbatch status`: how far jobs are, how fast they go, when they will finish, what failed.

Everything comes from the ledger: `job_progress`, the per-status counters behind it
(`job_item_counts`, so a job of a million items costs a few rows) and the failed items grouped
by error code. Rates count succeeded items per second since the job started.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text

STAGES = ("pending", "embedding", "ready", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("pending", "running")  # job statuses that still change


def _when(value: Any) -> datetime | None:
    """Timestamps from raw SQL: datetimes on PostgreSQL, ISO strings on SQLite."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def collect(engine: Engine, *, job_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """One dict per job (the given one, or the `limit` most recently started)."""
    query = "SELECT * FROM job_progress"
    params: dict[str, Any] = {}
    if job_id:
        query += " WHERE job_id = :job"
        params["job"] = job_id
    else:
        query += " ORDER BY started_at IS NULL, started_at DESC LIMIT :limit"
        params["limit"] = limit
    now = datetime.now(UTC)
    jobs = []
    with engine.connect() as conn:
        for row in conn.execute(text(query), params).mappings():
            job = dict(row)
            counts = dict.fromkeys(STAGES, 0) | {
                str(status): int(n)
                for status, n in conn.execute(
                    text("SELECT status, n FROM job_item_counts WHERE job_id = :job"),
                    {"job": job["job_id"]},
                )
            }
            failures = conn.execute(
                text(
                    "SELECT error_code, COUNT(*) AS n FROM items WHERE job_id = :job "
                    "AND status = 'failed' GROUP BY error_code ORDER BY n DESC, error_code"
                ),
                {"job": job["job_id"]},
            )
            started, finished = _when(job["started_at"]), _when(job["finished_at"])
            elapsed = ((finished or now) - started).total_seconds() if started else 0.0
            rate = counts["succeeded"] / elapsed if elapsed > 0 else 0.0
            left = sum(counts[s] for s in ("pending", "embedding", "ready", "running"))
            job |= {
                "stages": counts,
                "failures": {str(code): int(n) for code, n in failures},
                "elapsed_seconds": round(elapsed, 1),
                "items_per_second": round(rate, 3),
                "eta_seconds": (
                    round(left / rate) if rate > 0 and left and job["status"] in ACTIVE else None
                ),
                "percent_done": float(job["percent_done"] or 0),
            }
            jobs.append(job)
    return jobs


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def table(jobs: list[dict[str, Any]]) -> str:
    lines = [
        f"{'job':32}  {'status':9}  {'done':>6}  {'total':>7}  {'ok':>7}  {'failed':>6}  "
        f"{'items/s':>8}  {'eta':>7}  name"
    ]
    for j in jobs:
        lines.append(
            f"{j['job_id']:32}  {j['status']:9}  {j['percent_done']:5.1f}%  {j['total']:>7}  "
            f"{j['succeeded']:>7}  {j['failed']:>6}  {j['items_per_second']:8.2f}  "
            f"{_duration(j['eta_seconds']):>7}  {j['name']}"
        )
        if j["failures"]:
            lines.append(
                "  failed: " + ", ".join(f"{n} x {code}" for code, n in j["failures"].items())
            )
    return "\n".join(lines)


def bars(job: dict[str, Any], width: int = 40) -> str:
    """One bar per stage, scaled to the job's items."""
    total = max(1, int(job["total"]))
    lines = [
        f"job {job['job_id']} ({job['name']}): {job['status']}, {job['percent_done']:.1f}% done, "
        f"{job['items_per_second']:.2f} items/s, eta {_duration(job['eta_seconds'])}"
    ]
    for stage in STAGES:
        n = job["stages"][stage]
        filled = round(width * n / total)
        lines.append(f"  {stage:10} {'#' * filled}{'.' * (width - filled)} {n:>8}")
    for code, n in job["failures"].items():
        lines.append(f"  failed: {n} x {code}")
    return "\n".join(lines)


def watch(engine: Engine, *, job_id: str, interval: float) -> int:
    """Redraw the job's stage bars every `interval` seconds until it stops changing."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    while True:
        jobs = collect(engine, job_id=job_id)
        if not jobs:
            print(f"no job {job_id}", file=sys.stderr)
            return 2
        print(clear + bars(jobs[0]), flush=True)
        if jobs[0]["status"] not in ACTIVE:
            return 0
        time.sleep(interval)
        if not clear:
            print()
