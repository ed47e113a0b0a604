"""Thin Celery tasks: decode ids, run a stage patiently, send the work on. Nothing else.

What happens on an error is decided once (`core.errors.classify`):
- the item's fault: the stage has failed it; the message is done;
- an outage (S3, the database, the broker, the network): the stage has given its items back;
  this worker holds its one message and takes no other work, waits with backoff until the
  dependency answers, then runs it again (`workers.backpressure`); past IPBATCH_OUTAGE_PATIENCE
  the message goes back to the front of its queue;
- a configuration error (a models folder, credentials): the items are given back, the message
  goes back to its queue for a healthy worker, and this worker says why in its log and exits
  with code 2 (`workers.lifeline`), so that a supervisor sees it;
- the worker asked to stop (SIGTERM) while it waits out an outage: the wait ends at once and
  the message goes back to its queue.

The stage context (database engine, S3 client, models) is built on the first task a worker
process runs, never at import and never in the prefork parent.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Task, signals
from celery.exceptions import Reject

from core.clock import utcnow
from core.config import Settings
from core.errors import Action, Decision, classify
from storage.lifecycle import EMBED, GENERATE, INGEST, NORMAL, TRAIN, JobStage, Stage
from workers.backpressure import OutOfPatience, patiently
from workers.celery_app import app, priority
from workers.context import StageContext
from workers.lifeline import PARENT_PID, STOP_FILE, WORKER_NAME
from workers.stages.common import Send, send_in_messages
from workers.stages.runs import RUNS

log = logging.getLogger(__name__)


@functools.cache
def context() -> StageContext:
    return StageContext.create(Settings(), mode="distributed", worker=os.environ.get(WORKER_NAME))


# --- stopping: a pool process learns that its worker is shutting down ----------------------

STOPPING = threading.Event()  # set in a pool process when its worker shuts down


class Stopping(Exception):
    """The worker is shutting down while this message waits out an outage."""


def _sleep_unless_stopping(seconds: float) -> None:
    if STOPPING.wait(seconds):
        raise Stopping("the worker is shutting down")


@signals.worker_process_init.connect
def _listen_for_shutdown(**_: Any) -> None:
    """In each pool process: SIGUSR2 (sent by the parent below) ends an outage wait."""
    signal.signal(signal.SIGUSR2, lambda *_: STOPPING.set())


@signals.worker_shutting_down.connect
def _tell_the_pool(**_: Any) -> None:
    """In the worker (parent) process, on SIGTERM: its pool processes stop waiting."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid():
                os.kill(int(stat.parent.name), signal.SIGUSR2)
        except (OSError, IndexError, ValueError):
            continue


def _broker_answers() -> bool:
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except Exception:
        return False
    return True


def _probe(decision: Decision) -> bool:
    if decision.dependency == "broker":
        return _broker_answers()
    return context().probe(decision)


def _run(task: Task, work: Callable[[], Any]) -> Any:
    """Run one message's work with the error policy above."""
    settings = context().settings
    since = utcnow().isoformat(timespec="seconds")
    _working_on(task, {"task": task.name, "args": _describe(task.request.args), "since": since})
    try:
        return patiently(
            work,
            probe=_probe,
            patience=settings.outage_patience,
            backoff_max=settings.backoff_max,
            sleep=_sleep_unless_stopping,
        )
    except (OutOfPatience, Stopping) as exc:
        log.error("giving message %s back to its queue: %s", task.request.id, exc)
        raise Reject(str(exc), requeue=True) from exc
    except Exception as exc:
        decision = classify(exc)
        if decision.action is not Action.CONFIG:
            raise
        _stop_worker(task, decision)
        raise Reject(decision.message, requeue=True) from exc
    finally:
        _working_on(task, None)


def _describe(args: Any) -> Any:
    """A message's arguments as `ipbatch workers` shows them: a job id, or item ids (the
    first few and how many)."""
    if args and isinstance(args[0], list):
        ids = args[0]
        return {"items": len(ids), "first": ids[:3]}
    return {"job_id": args[0]} if args else None


def _working_on(task: Task, current: dict[str, Any] | None) -> None:
    """Record what this worker is doing (None: between messages) and the pipelines it keeps
    warm. Best effort: the ledger may be what is away."""
    from storage.ledger import workers

    name = os.environ.get(WORKER_NAME) or task.request.hostname
    try:
        ctx = context()
        models = ["+".join(key) for key in ctx.generators.loaded()] if ctx.has_generators else None
        with ctx.sessions.begin() as session:
            workers.working_on(session, name=name, current=current, models=models)
    except Exception as exc:
        log.debug("could not record the current work: %s", exc)


def _stop_worker(task: Task, decision: Decision) -> None:
    """A configuration error: say so, leave it for the worker process, and ask it to stop
    (it exits 2 once this message is back in its queue)."""
    queue = (task.request.delivery_info or {}).get("routing_key") or task.queue
    log.error(
        "CONFIGURATION ERROR, this worker stops (exit code 2) and its %s message goes back to "
        "the queue; fix it and start the worker again: %s",
        queue,
        decision.message,
    )
    stop_file, parent = os.environ.get(STOP_FILE), os.environ.get(PARENT_PID)
    if stop_file:
        Path(stop_file).write_text(f"{queue}: {decision.message}\n")
    if parent:
        os.kill(int(parent), signal.SIGTERM)
        return
    try:  # not started by `ipbatch worker`: at least stop taking this queue's work
        app.control.cancel_consumer(queue, destination=[task.request.hostname], reply=False)
    except Exception:  # the broker is away too: the next message fails the same way
        log.warning("could not stop consuming %s", queue, exc_info=True)


@app.task(name="ipbatch.ingest", bind=True)
def ingest(self: Task, job_id: str) -> None:
    run = functools.partial(RUNS[INGEST.name], context(), job_id=job_id, send=send_for_job(job_id))
    summary = _run(self, run)
    log.info("job %s ingested: %s", job_id, summary, extra={"job_id": job_id})


@app.task(name="ipbatch.embed", bind=True)
def embed(self: Task, item_ids: list[int]) -> None:
    summary = _run(self, functools.partial(RUNS[EMBED.name], context(), item_ids=item_ids))
    send_in_messages(context().settings, send, GENERATE, summary.ready)
    if summary.held:  # another worker's claim: if that worker died, take over when it lapses
        send(EMBED, summary.held, urgent=True, countdown=summary.retry_in + 1)
    if summary.deferred:  # this message was another job's turn: its items wait for another
        send(EMBED, summary.deferred)


@app.task(name="ipbatch.generate", bind=True)
def generate(self: Task, item_ids: list[int]) -> None:
    summary = _run(self, functools.partial(RUNS[GENERATE.name], context(), item_ids=item_ids))
    send_in_messages(context().settings, send_urgent, EMBED, summary.embed_again)
    if summary.held:
        send(GENERATE, summary.held, urgent=True, countdown=summary.retry_in + 1)
    if summary.deferred:
        send(GENERATE, summary.deferred)


@app.task(name="ipbatch.train", bind=True)
def train(self: Task, job_id: str) -> None:
    """A training run on a GPU worker (queue `train`). Held by another worker: sent again
    when that worker's lease runs out (if it died, this one resumes from its checkpoint)."""
    summary = _run(self, functools.partial(RUNS[TRAIN.name], context(), job_id=job_id))
    log.info("training job %s: %s at step %d", job_id, summary.status, summary.step)
    if summary.status == "held":
        send_train(job_id, countdown=summary.retry_in + 1)


def send_train(job_id: str, *, countdown: float = 0) -> None:
    send_job(TRAIN, job_id, countdown=countdown)


# each stage's task, by stage name (what each runs: `workers.stages.runs.RUNS`)
TASKS: dict[str, Any] = {
    INGEST.name: ingest,
    EMBED.name: embed,
    GENERATE.name: generate,
    TRAIN.name: train,
}


def send(
    stage: Stage,
    item_ids: list[int],
    *,
    urgent: bool = False,
    countdown: float = 0,
    level: int | None = None,
) -> None:
    """One message of `item_ids` for `stage`; urgent ones (work sent again) go first, the
    others at their job's priority (a message holds items of one job; `level`: the caller
    knows it, else it is read from the ledger)."""
    broker = context().settings.broker_url.get_secret_value()
    if urgent or not item_ids:
        level = NORMAL
    elif level is None:
        level = _level(item_id=item_ids[0])
    TASKS[stage.name].apply_async(
        (item_ids,),
        priority=priority(broker, urgent=urgent, level=level),
        countdown=countdown or None,
        # what logs show, as Celery writes it (a repr cut at 1,024 characters) but in C:
        # Celery's own saferepr took a sixth of an ingest's publishing
        argsrepr=repr((item_ids,))[:1024],
    )


def send_for_job(job_id: str) -> Send:
    """`send` for the items of one job (an ingest's thousands of messages): the job's level is
    read once, at the first message (a job's priority is set when it is submitted)."""
    level = functools.cache(lambda: _level(job_id=job_id))
    return lambda stage, item_ids: send(stage, item_ids, level=level())


def _level(*, job_id: str | None = None, item_id: int | None = None) -> int:
    """A job's priority level, from the ledger (normal if it cannot be read now)."""
    from storage.ledger import jobs

    try:
        with context().sessions.begin() as session:
            return jobs.priority_of(session, job_id=job_id, item_id=item_id)
    except Exception as exc:  # sending matters more than its order
        log.warning("priority unknown (%s): sent as normal", exc)
        return NORMAL


def send_urgent(stage: Stage, item_ids: list[int]) -> None:
    send(stage, item_ids, urgent=True)


def send_job(stage: JobStage, job_id: str, *, urgent: bool = False, countdown: float = 0) -> None:
    """One message of `job_id` for a job stage (ingest, train); urgent ones (work sent again,
    or a held job tried again later) go first."""
    broker = context().settings.broker_url.get_secret_value()
    urgent = urgent or bool(countdown)
    TASKS[stage.name].apply_async(
        (job_id,),
        priority=priority(broker, urgent=urgent, level=NORMAL if urgent else _level(job_id=job_id)),
        countdown=countdown or None,
    )


def send_job_urgent(stage: JobStage, job_id: str) -> None:
    send_job(stage, job_id, urgent=True)


def send_ingest(job_id: str, *, urgent: bool = False) -> None:
    send_job(INGEST, job_id, urgent=urgent)
