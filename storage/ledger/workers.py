"""Worker processes as they report themselves (`ipbatch worker` beats every BEAT_SECONDS; the
process running a message records it as `current`). A worker is live while its last beat is
under LIVE_SECONDS old: three beats missed, it is taken for gone (killed, its machine down)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Worker

BEAT_SECONDS = 30.0
LIVE_SECONDS = 3 * BEAT_SECONDS
READY, WAITING, STOPPED = "ready", "waiting", "stopped"


def beat(
    session: Session,
    *,
    name: str,
    queues: list[str],
    pid: int,
    state: str,
    problem: str | None = None,
    now: datetime,
) -> None:
    """The worker's heartbeat: its state now (and why, when it waits or stopped). A new
    process under a known name starts the record afresh."""
    worker = session.get(Worker, name)
    if worker is None or worker.pid != pid:
        if worker is not None:
            session.delete(worker)
            session.flush()
        session.add(
            Worker(
                name=name,
                queues=queues,
                pid=pid,
                state=state,
                problem=problem,
                started_at=now,
                heartbeat_at=now,
            )
        )
        return
    worker.state, worker.problem, worker.heartbeat_at = state, problem, now
    if state == STOPPED:
        worker.current = None


def working_on(
    session: Session,
    *,
    name: str,
    current: dict[str, Any] | None,
    models: list[str] | None = None,
) -> None:
    """What the worker's process is doing (None: between messages), and the pipelines it
    keeps warm. A worker not registered (a test's in-process stage) is left alone."""
    worker = session.get(Worker, name)
    if worker is None:
        return
    worker.current = current
    if models is not None:
        worker.models = models


@dataclass(frozen=True)
class WorkerView:
    name: str
    queues: list[str]
    pid: int
    state: str  # ready, waiting, stopped; "gone" when the beats stopped without a word
    problem: str | None
    models: list[str]
    current: dict[str, Any] | None
    started_at: datetime
    heartbeat_at: datetime
    live: bool


def listing(session: Session, *, now: datetime) -> list[WorkerView]:
    """Every worker the ledger knows, live ones first, newest beat first."""
    cutoff = now - timedelta(seconds=LIVE_SECONDS)
    views = []
    for w in session.scalars(select(Worker).order_by(Worker.heartbeat_at.desc())):
        live = w.state != STOPPED and w.heartbeat_at >= cutoff
        state = w.state if live or w.state == STOPPED else "gone"
        views.append(
            WorkerView(
                w.name,
                list(w.queues),
                w.pid,
                state,
                w.problem,
                list(w.models or []),
                w.current if live else None,
                w.started_at,
                w.heartbeat_at,
                live,
            )
        )
    return sorted(views, key=lambda v: not v.live)


def known(session: Session) -> bool:
    """Has any worker ever reported to this ledger (a deployment, not one machine)?"""
    return session.scalar(select(Worker.name).limit(1)) is not None


def consumers(views: list[WorkerView]) -> dict[str, int]:
    """Of a `listing`: live workers taking work, per queue (a waiting one consumes nothing
    yet)."""
    counts: dict[str, int] = {}
    for view in views:
        if view.live and view.state == READY:
            for queue in view.queues:
                counts[queue] = counts.get(queue, 0) + 1
    return counts


def stopped_by_configuration(views: list[WorkerView]) -> list[WorkerView]:
    """Of a `listing`: workers that exited on a configuration error and have not come back."""
    return [v for v in views if v.state == STOPPED and v.problem]
