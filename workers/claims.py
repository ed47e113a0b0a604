"""One claim scope: how every stage takes its items, holds them and gives them back.

    with claimed(ctx, GENERATE, item_ids) as work:
        for item_id in work.ids:
            with work.item(item_id, unexpected=ErrorCode.MODEL_ERROR):
                ...                      # an error that is this item's fault fails it alone
                work.done([item_id])     # ... -> the stage's next status

`claimed` takes the items under a new fencing token with a lease, renews the lease from a
heartbeat thread while the block runs, and on the way out, however the block ends, settles
every item the block neither finished nor failed:
- an outage, a configuration error, the process stopping (`classify`: RETRY, CONFIG, STOP):
  the items go back to waiting with their claim refunded (an outage is not a delivery), and
  the exception goes on to the caller (Celery's task or the runner), which backs off or stops;
- any other error escaping the block (a bug: `classify` says FAIL): the items fail with it;
- the block returned with items left: they are released, and the stage's bug is logged.
No stage writes a release path of its own.

In a distributed deployment a message is a turn: it may take another job's items instead
(`storage.ledger.items.next_turn`: priority first, then the job of that level that waited
longest), and the message's own items wait in `work.deferred` for the task to send again.

Every write for a claimed item carries the token: a worker whose lease lapsed and whose items
another worker took over (a long pause, a stopped VM that came back) writes nothing; that is
logged and counted (`ipbatch_fenced_writes_total`).

A job stage (ingest, train) takes a whole job the same way, with `claimed_job`:

    with claimed_job(ctx, INGEST, job_id) as claim:
        if claim is None:
            return                       # held elsewhere, done, or ended
        ...                              # writes carry claim.token and hold the claim

On the way out: `StopJob` (the claim was lost, or the job cancelled) ends the block quietly;
`JobInputError` (the job's own input is unusable) or an error `classify` calls FAIL fails the
job; an outage, a configuration error or a stop gives the job back (it waits for its stage
again) and goes on to the caller.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import Action, Decision, ErrorCode, classify, short
from storage.ledger import items, job_claims, jobs
from storage.lifecycle import JobStage, Stage
from storage.models import ItemStatus, JobStatus
from workers import metrics

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.context import StageContext

log = logging.getLogger(__name__)
Record = Callable[["Session", list[int]], None]


class ClaimedWork:
    """The items a stage holds under one token, and every way they can leave it."""

    def __init__(
        self,
        ctx: StageContext,
        stage: Stage,
        claim: items.Claim,
        *,
        others: list[int],
        held: list[int],
        retry_in: float,
        deferred: list[int],
    ) -> None:
        self.ctx = ctx
        self.stage = stage
        self.token = claim.token
        self.ids = claim.ids  # claimed by this scope, in id order
        self.others = others  # asked for but not claimed: moved on, or held elsewhere
        self.held = held  # of those, held by another worker under a live lease
        self.retry_in = retry_in  # seconds until the first of those leases runs out
        self.deferred = deferred  # the message's own items, waiting: it was another job's turn
        self._open = set(claim.ids)
        self._lock = threading.Lock()

    @property
    def open(self) -> list[int]:
        """Claimed items not finished, failed or given back yet."""
        with self._lock:
            return sorted(self._open)

    def item(self, item_id: int, *, unexpected: ErrorCode = ErrorCode.INTERNAL) -> _ItemScope:
        """`with work.item(item_id):` an error that is the item's own fault fails this item
        alone and ends the block; any other error goes on up to the claim scope."""
        return _ItemScope(self, [item_id], unexpected)

    def items(self, item_ids: Sequence[int], *, unexpected: ErrorCode) -> _ItemScope:
        """Like `item`, for several items that stand or fall together (one diffusers call)."""
        return _ItemScope(self, list(item_ids), unexpected)

    def done(self, item_ids: Sequence[int], *, record: Record | None = None) -> list[int]:
        """Items finished: to the stage's next status, with `record(session, moved)` written
        in the same transaction. Returns those moved; the rest were no longer ours."""
        return self._move(item_ids, self.stage.next, record=record)

    def fail(self, item_ids: Sequence[int], decision: Decision) -> list[int]:
        assert decision.code is not None
        moved = self._move(
            item_ids,
            ItemStatus.FAILED,
            message=decision.message,
            error_code=decision.code.value,
        )
        metrics.ITEMS.labels(self.stage.name, "failed").inc(len(moved))
        return moved

    def cancel(self, item_ids: Sequence[int], message: str) -> list[int]:
        return self._move(item_ids, ItemStatus.CANCELLED, message=message)

    def send_back(self, item_ids: Sequence[int], to_status: ItemStatus, message: str) -> list[int]:
        """To an earlier stage (a cached embedding the item needs is gone: embed it again)."""
        return self._move(item_ids, to_status, message=message)

    def release(self, item_ids: Sequence[int], message: str) -> list[int]:
        """Back to waiting, the claim refunded: not the item's fault, not a delivery."""
        moved = self._move(item_ids, self.stage.waiting, message=message, refund=True)
        metrics.ITEMS.labels(self.stage.name, "released").inc(len(moved))
        return moved

    def still_held(self, item_ids: Sequence[int]) -> list[int]:
        """Those of `item_ids` still ours (checked before anything is uploaded for them); the
        others were taken over: they leave this scope, counted as fenced."""
        with self.ctx.sessions.begin() as session:
            mine = items.still_held(
                session, item_ids=item_ids, working=self.stage.working, token=self.token
            )
        self._lost(sorted(set(item_ids) - set(mine)), "before uploading")
        return mine

    def _move(
        self,
        item_ids: Sequence[int],
        to_status: ItemStatus,
        *,
        message: str | None = None,
        error_code: str | None = None,
        refund: bool = False,
        record: Record | None = None,
    ) -> list[int]:
        with self._lock:  # out of `open` while moving: the heartbeat leaves them alone
            wanted = [i for i in item_ids if i in self._open]
            self._open.difference_update(wanted)
        if not wanted:
            return []
        try:
            with self.ctx.sessions.begin() as session:
                moved = items.transition(
                    session,
                    item_ids=wanted,
                    from_status=self.stage.working,
                    to_status=to_status,
                    now=self.ctx.clock(),
                    worker=self.ctx.worker,
                    token=self.token,
                    message=message,
                    error_code=error_code,
                    refund_attempt=refund,
                )
                if record is not None and moved:
                    record(session, moved)
        except BaseException:
            with self._lock:
                self._open.update(wanted)
            raise
        self._fenced(sorted(set(wanted) - set(moved)), f"moving to {to_status}")
        return moved

    def _lost(self, item_ids: Sequence[int], when: str) -> None:
        """Open items found no longer ours: they leave the scope."""
        with self._lock:
            lost = [i for i in item_ids if i in self._open]
            self._open.difference_update(lost)
        self._fenced(lost, when)

    def _fenced(self, item_ids: Sequence[int], when: str) -> None:
        """Items no longer ours (taken over after our lease lapsed, or cancelled): nothing is
        written for them, and that is said."""
        if not item_ids:
            return
        metrics.FENCED.labels(self.stage.name).inc(len(item_ids))
        log.warning(
            "%d items are no longer held by this worker (%s): nothing written for them",
            len(item_ids),
            when,
            extra={"item_ids": list(item_ids), "worker": self.ctx.worker},
        )

    def _settle(self, exc: BaseException) -> None:
        """The block ended with `exc`: give back or fail every item still open. Never raises
        (with the database away the items' lease lapses and the reaper takes them)."""
        left = self.open
        if not left:
            return
        decision = classify(exc)
        try:
            if decision.action is Action.FAIL:
                log.error("unexpected error with %d items claimed", len(left), exc_info=exc)
                self.fail(left, decision)
            else:
                self.release(left, _release_message(decision))
        except Exception:
            log.warning("could not give back %d items; their lease will lapse", len(left))


def _release_message(decision: Decision) -> str:
    if decision.action is Action.RETRY:
        return f"retrying: {decision.message}"
    if decision.action is Action.CONFIG:
        return f"released: this worker's configuration: {decision.message}"
    return f"released: {decision.message}"


class _ItemScope:
    def __init__(self, work: ClaimedWork, item_ids: list[int], unexpected: ErrorCode) -> None:
        self.work = work
        self.item_ids = item_ids
        self.unexpected = unexpected

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        decision = classify(exc, unexpected=self.unexpected)
        if decision.action is not Action.FAIL:
            return False  # not these items' fault: the claim scope gives everything back
        if not decision.expected:
            log.error("items %s failed", self.item_ids, exc_info=exc)
        self.work.fail(self.item_ids, decision)
        return True


@contextmanager
def claimed(ctx: StageContext, stage: Stage, item_ids: Sequence[int]) -> Iterator[ClaimedWork]:
    """Claim `item_ids` for `stage` (or, distributed, the items of the job whose turn it
    is), hold them while the block runs, settle them after."""
    with ctx.sessions.begin() as session:
        now = ctx.clock()
        # 1. whose turn: distributed, the job that waited longest at the highest priority
        #    (the message's own items may wait: `work.deferred`, sent again by the task);
        #    the one-machine runner runs one job and takes the items it was given
        turn = items.Turn(job_id=None, ids=list(item_ids), deferred=[])
        if ctx.mode == "distributed":
            turn = items.next_turn(session, stage=stage, item_ids=item_ids)
        # 2. the claim: waiting -> working (or a lapsed lease taken over) under a new token
        claim = items.claim(
            session,
            item_ids=turn.ids,
            stage=stage,
            worker=ctx.worker,
            lease_seconds=ctx.settings.lease_seconds,
            now=now,
            max_attempts=ctx.settings.max_deliveries,
        )
        if claim.ids and turn.job_id is not None:
            items.served(session, job_id=turn.job_id, stage=stage, now=now)
        others = sorted(set(turn.ids) - set(claim.ids) - set(claim.failed))
        held, retry_in = items.held_elsewhere(
            session, item_ids=others, working=stage.working, now=now
        )
    if turn.deferred:
        log.debug("%s: job %s's turn; items %s wait", stage.name, turn.job_id, turn.deferred)
    metrics.ITEMS.labels(stage.name, "failed").inc(len(claim.failed))
    work = ClaimedWork(
        ctx, stage, claim, others=others, held=held, retry_in=retry_in, deferred=turn.deferred
    )
    # 2. the heartbeat renews the lease while the block runs; 3. settle what is left
    heartbeat = _Heartbeat(work)
    try:
        yield work
    except BaseException as exc:
        heartbeat.stop()
        work._settle(exc)
        raise
    finally:
        heartbeat.stop()
    if work.open:
        log.error("stage %s left %d items unfinished: released", stage.name, len(work.open))
        work.release(work.open, "released: the stage left it unfinished (a bug)")


class _Heartbeat:
    """Every third of the lease, renew it for the open items; items found taken over leave
    the scope (fenced)."""

    def __init__(self, work: ClaimedWork) -> None:
        self.work = work
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        work, lease = self.work, self.work.ctx.settings.lease_seconds
        while not self._stop.wait(lease / 3):
            ids = work.open
            if not ids:
                continue
            try:
                with work.ctx.sessions.begin() as session:
                    kept = items.extend_leases(
                        session,
                        item_ids=ids,
                        working=work.stage.working,
                        token=work.token,
                        lease_seconds=lease,
                        now=work.ctx.clock(),
                    )
            except Exception as exc:  # the database is away: the claim may lapse, never a crash
                log.warning("heartbeat for %d items failed: %s", len(ids), short(exc))
                continue
            work._lost(sorted(set(ids) - set(kept)), "at the heartbeat")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


# --- a whole job ----------------------------------------------------------------------------


class StopJob(Exception):  # noqa: N818 (not an error: the work ends quietly)
    """The job's claim was lost (another worker holds it now) or the job was cancelled:
    stop quietly, write nothing more."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status  # "lost" or "cancelled"


class JobInputError(Exception):
    """The job's own input cannot be used (a manifest that is not there, or may not be read):
    the job fails, not the worker."""


@dataclass
class JobClaim:
    """A job stage's claim on a job; after the block, how it ended (`stopped`, `failed`)."""

    job_id: str
    stage: JobStage
    token: str
    stopped: str | None = None  # "lost" or "cancelled"
    failed: str | None = None  # the message the job failed with


@contextmanager
def claimed_job(ctx: StageContext, stage: JobStage, job_id: str) -> Iterator[JobClaim | None]:
    """Take the job for `stage` (None: another worker holds it, its work is done, or it has
    ended) and settle the claim however the block ends (see the module's docstring)."""
    with ctx.sessions.begin() as session:
        token = job_claims.claim(
            session,
            job_id=job_id,
            stage=stage,
            worker=ctx.worker,
            lease_seconds=ctx.settings.lease_seconds,
            now=ctx.clock(),
        )
    if token is None:
        yield None
        return
    claim = JobClaim(job_id, stage, token)
    try:
        yield claim
    except StopJob as stop:
        claim.stopped = stop.status
        log.warning("job %s: %s %s; this worker stops", job_id, stage.label, stop.status)
    except JobInputError as exc:
        _fail_job(ctx, claim, str(exc))
    except BaseException as exc:
        decision = classify(exc)
        if decision.action is Action.FAIL:
            log.error("%s of job %s failed", stage.label, job_id, exc_info=exc)
            _fail_job(ctx, claim, f"{stage.label} failed: {decision.message}")
            return
        try:
            with ctx.sessions.begin() as session:
                job_claims.end(
                    session,
                    job_id=job_id,
                    token=token,
                    now=ctx.clock(),
                    worker=ctx.worker,
                    message=f"{stage.label} given back: {decision.message}",
                )
        except Exception:
            log.warning("could not give job %s back; its %s lease will lapse", job_id, stage.label)
        raise


def hold_job(ctx: StageContext, session: Session, claim: JobClaim) -> JobStatus:
    """Before a write under the claim, in the write's transaction: the job row locked, the
    claim checked and renewed. Returns the job's status (running, or cancelled meanwhile);
    StopJob("lost") if another worker holds the job now."""
    status = job_claims.hold(
        session,
        job_id=claim.job_id,
        token=claim.token,
        lease_seconds=ctx.settings.lease_seconds,
        now=ctx.clock(),
    )
    if status is None:
        raise StopJob("lost")
    return status


def _fail_job(ctx: StageContext, claim: JobClaim, message: str) -> None:
    claim.failed = message
    with ctx.sessions.begin() as session:
        jobs.fail(session, job_id=claim.job_id, message=message, now=ctx.clock(), worker=ctx.worker)
