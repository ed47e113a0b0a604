"""`ipbatch status`: how far jobs are, how fast they go, when they will finish, what failed.

Everything comes from the ledger: `job_progress`, the per-status counters behind it
(`job_item_counts`, so a job of a million items costs a few rows) and the failed items grouped
by error code. Rates count succeeded items per second since the job started.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ipbatch.exits import job_exit
from storage.ledger import queries, workers
from storage.lifecycle import INGEST, JOB_ACTIVE, STAGES, TERMINAL, TRAIN

# the bars, in the order of an item's life: each stage's waiting and working status, then the end
STATUSES = tuple(str(s) for stage in STAGES for s in (stage.waiting, stage.working)) + tuple(
    str(s) for s in TERMINAL
)
ACTIVE = tuple(str(s) for s in JOB_ACTIVE)  # job statuses that still change


def collect(engine: Engine, *, job_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """One dict per job (the given one, or the `limit` most recently started)."""
    now = datetime.now(UTC)
    jobs = []
    with Session(engine) as session:
        # a deployment's workers (one machine has none): which queues someone takes work from
        known = workers.known(session)
        consumers = workers.consumers(workers.listing(session, now=now)) if known else None
        for job in queries.progress(session, job_id=job_id, limit=limit):
            counts = queries.status_counts(session, job_id=job["job_id"])
            started, finished = job["started_at"], job["finished_at"]
            elapsed = ((finished or now) - started).total_seconds() if started else 0.0
            rate = counts["succeeded"] / elapsed if elapsed > 0 else 0.0
            left = sum(counts[str(s)] for stage in STAGES for s in (stage.waiting, stage.working))
            job |= {
                "stages": {status: counts[status] for status in STATUSES},
                "failures": queries.failures_by_code(session, job_id=job["job_id"]),
                "elapsed_seconds": round(elapsed, 1),
                "items_per_second": round(rate, 3),
                "eta_seconds": (
                    round(left / rate) if rate > 0 and left and job["status"] in ACTIVE else None
                ),
                "training": _training(session, job["job_id"], elapsed, job["status"]),
            }
            if job["training"] is not None:  # a training job has steps, not items
                run = job["training"]
                job["percent_done"] = round(100 * run["step"] / max(1, run["total_steps"]), 1)
            job["unattended"] = _unattended(job, counts, consumers)
            if job_id is not None:  # one job: its images, and how many were made before
                job |= queries.images(session, job_id=job_id)
            jobs.append(job)
    return jobs


def _unattended(
    job: dict[str, Any], counts: dict[str, int], consumers: dict[str, int] | None
) -> list[str]:
    """The queues this job waits on that no live worker takes work from."""
    if consumers is None or job["status"] not in ACTIVE:
        return []
    waiting = [stage.queue for stage in STAGES if counts[str(stage.waiting)]]
    if job["training"] is not None:
        waiting = [TRAIN.queue]
    elif job["status"] == "pending":
        waiting = [INGEST.queue]
    return [queue for queue in waiting if not consumers.get(queue)]


def _nobody(job: dict[str, Any]) -> list[str]:
    return [f"  no worker is consuming {queue}: `ipbatch workers`" for queue in job["unattended"]]


def _training(session: Session, job_id: str, elapsed: float, status: str) -> Any:
    """A training job's step, loss and latest scores (without the curve: `report` draws it);
    steps per second and ETA over the whole run, resumes included."""
    run = queries.training_summary(session, job_id=job_id)
    if run is None:
        return None
    speed = run["step"] / elapsed if elapsed > 0 else 0.0
    left = run["total_steps"] - run["step"]
    run["steps_per_second"] = round(speed, 3)
    run["eta_seconds"] = round(left / speed) if speed > 0 and status in ACTIVE else None
    run["validation"] = run.pop("validations")[-1:] or None
    return run


def _training_line(run: dict[str, Any]) -> str:
    loss = "-" if run["loss"] is None else f"{run['loss']:.4f}"
    line = (
        f"  train {run['adapter']}: step {run['step']}/{run['total_steps']}, loss {loss}, "
        f"{run['steps_per_second']:.2f} steps/s, eta {_duration(run['eta_seconds'])}"
    )
    if run["skipped_steps"]:
        line += f", {run['skipped_steps']} steps skipped (fp16 overflow)"
    if run["checkpoint_step"] is not None:
        line += f", checkpoint at step {run['checkpoint_step']}"
    if run["validation"]:
        [last] = run["validation"]
        clip_t = "-" if last["clip_t"] is None else f"{last['clip_t']:.3f}"
        line += f"; CLIP-I {last['clip_i']:.3f} CLIP-T {clip_t} (step {last['step']})"
    if run["skipped"]:
        line += f"; {len(run['skipped'])} rows skipped"
    return line


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
        if j["error"]:
            lines.append(f"  {j['error']}")
        if j["failures"]:
            lines.append(
                "  failed: " + ", ".join(f"{n} x {code}" for code, n in j["failures"].items())
            )
        if j["training"]:
            lines.append(_training_line(j["training"]))
        lines += _nobody(j)
    return "\n".join(lines)


def bars(job: dict[str, Any], width: int = 40) -> str:
    """One bar per stage, scaled to the job's items (a training job: one bar of steps)."""
    run = job["training"]
    if run is not None:
        filled = round(width * run["step"] / max(1, run["total_steps"]))
        return "\n".join(
            [
                f"job {job['job_id']} ({job['name']}): {job['status']}",
                f"  steps      {'#' * filled}{'.' * (width - filled)} {run['step']:>8}",
                _training_line(run),
                *_nobody(job),
            ]
        )
    total = max(1, int(job["total"]))
    lines = [
        f"job {job['job_id']} ({job['name']}): {job['status']}, {job['percent_done']:.1f}% done, "
        f"{job['items_per_second']:.2f} items/s, eta {_duration(job['eta_seconds'])}"
    ]
    for stage in STATUSES:
        n = job["stages"][stage]
        filled = round(width * n / total)
        lines.append(f"  {stage:10} {'#' * filled}{'.' * (width - filled)} {n:>8}")
    if job.get("images"):
        lines.append(_cost_line(job))
    if job["error"]:
        lines.append(f"  {job['error']}")
    for code, n in job["failures"].items():
        lines.append(f"  failed: {n} x {code}")
    return "\n".join(lines + _nobody(job))


def _cost_line(job: dict[str, Any]) -> str:
    """What the job's images cost the GPU, and what copying those made before saved."""
    line = f"  images: {job['images']}, GPU {job['gpu_seconds']:.1f} s"
    if job["images_per_gpu_hour"]:
        line += f" ({job['images_per_gpu_hour']:,.0f} images per GPU-hour)"
    if job["reused"]:
        line += f"; {job['reused']} made before and copied"
        if job["gpu_seconds_saved"] is not None:
            line += f", saving about {job['gpu_seconds_saved']:.1f} GPU-s"
    return line


def forecast(engine: Engine, *, until: datetime, now: datetime) -> dict[str, Any]:
    """What the fleet can make by `until`: the images per second the active jobs have been
    recorded at since each started (copies included), summed, times the seconds left; and
    how many images the active jobs still need (their rows left, at each job's images per
    row so far; 1 before any)."""
    rate = left = 0.0
    with Session(engine) as session:
        active = [j for j in queries.progress(session, limit=10_000) if j["status"] in ACTIVE]
        for job in active:
            counts = queries.status_counts(session, job_id=job["job_id"])
            made = queries.images(session, job_id=job["job_id"])["images"]
            started = job["started_at"]
            elapsed = (now - started).total_seconds() if started else 0.0
            rate += made / elapsed if elapsed > 0 else 0.0
            rows = sum(counts[str(s)] for stage in STAGES for s in (stage.waiting, stage.working))
            left += rows * (made / counts["succeeded"] if counts["succeeded"] else 1.0)
    seconds = max(0.0, (until - now).total_seconds())
    return {
        "until": until.isoformat(),
        "seconds": round(seconds),
        "active_jobs": len(active),
        "images_per_second": round(rate, 3),
        "images_by_then": int(rate * seconds),
        "images_left": round(left),
        "all_done_at": (now + timedelta(seconds=left / rate)).isoformat() if rate else None,
    }


def next_time(clock: str, now: datetime) -> datetime:
    """The next HH:MM on `now`'s clock (today, or tomorrow if it has passed)."""
    try:
        hour, minute = (int(part) for part in clock.split(":"))
        when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError as exc:
        raise ValueError(f"--by {clock!r}: a time of day as HH:MM (07:00)") from exc
    return when if when > now else when + timedelta(days=1)


def forecast_line(f: dict[str, Any]) -> str:
    until = datetime.fromisoformat(f["until"])
    head = f"by {until:%H:%M} (in {_duration(f['seconds'])})"
    if not f["active_jobs"]:
        return f"{head}: no job is running"
    line = (
        f"{head}: about {f['images_by_then']:,} images at the {f['active_jobs']} running jobs' "
        f"{f['images_per_second']:.2f} images/s; {f['images_left']:,} images left"
    )
    if f["all_done_at"] is None:
        return line + " (no image recorded yet: no rate)"
    done = datetime.fromisoformat(f["all_done_at"])
    if f["images_by_then"] >= f["images_left"]:
        return line + f", all done by {done:%H:%M}"
    return line + f", not all by then (all at {done:%Y-%m-%d %H:%M})"


def watch(engine: Engine, *, job_id: str, interval: float) -> int:
    """Redraw the job's stage bars every `interval` seconds until it stops changing."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    while True:
        jobs = collect(engine, job_id=job_id)
        if not jobs:
            print(f"no job {job_id}", file=sys.stderr)
            return 2
        print(clear + bars(jobs[0]), flush=True)
        if jobs[0]["status"] not in ACTIVE:  # exit codes as `ipbatch run`'s
            return 0 if jobs[0]["training"] is not None else job_exit(jobs[0]["status"])
        time.sleep(interval)
        if not clear:
            print()
