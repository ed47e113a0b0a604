"""Items: the one function that changes an item's status, and claims.

`transition` checks the move against `lifecycle.ITEM_MOVES`, applies it only to items still in
the expected status (so a duplicate message or a late worker changes nothing), keeps the
per-job counters and appends an `item_events` row for each item it moved.

A distributed worker gives each message's turn to the job that should go next (`next_turn`:
the highest priority level first, and within a level the job that waited longest since its
last turn in the stage), so that jobs of one level share the workers round-robin; the
message's own items wait for a later turn.

A claim is a lease with a fencing token: `claim` moves items from a stage's waiting status to
its working status (or takes over working items whose lease ran out) under a new token. Every
later write for those items (`transition(..., token=)`, `extend_leases`, `still_held`,
`outputs.complete_item`) applies only while the items still carry that token, so a worker
whose lease lapsed and was taken over writes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, func, insert, or_, select, update
from sqlalchemy.orm import Session

from storage.ledger import counters
from storage.ledger.db import is_postgres, upsert
from storage.lifecycle import STAGES, Stage, check_item_move
from storage.models import Item, ItemEvent, ItemStatus, Job, JobItemCount, JobStatus, JobTurn


def _new_stage(from_status: ItemStatus, to_status: ItemStatus) -> bool:
    """Does the item enter another stage (or start over)? Its claims are counted afresh."""
    if from_status in (ItemStatus.FAILED, ItemStatus.SUCCEEDED):
        return True  # a retry, or a repair
    before = _stage_of(from_status)
    after = _stage_of(to_status)
    return after is not None and before is not None and after != before


def _stage_of(status: ItemStatus) -> str | None:
    for stage in STAGES:
        if status in (stage.waiting, stage.working):
            return stage.name
    return None


def transition(
    session: Session,
    *,
    item_ids: Sequence[int],
    from_status: ItemStatus,
    to_status: ItemStatus,
    now: datetime,
    worker: str | None = None,
    message: str | None = None,
    error_code: str | None = None,
    token: str | None = None,
    new_claim: tuple[str, float] | None = None,
    count_attempt: bool = False,
    refund_attempt: bool = False,
) -> list[int]:
    """Move the given items from `from_status` to `to_status`, if they are still there.

    - `token`: only items claimed under this token move (fencing: a worker that lost its
      claim changes nothing).
    - `new_claim=(token, lease_seconds)`: the items are claimed by this move; otherwise any
      claim they carried ends with it.
    - `count_attempt` counts a claim in `attempts`; `refund_attempt` takes it back when a
      worker gives its claim back cleanly (an outage, not the item), so that only deliveries
      whose worker died or hung add up towards IPBATCH_MAX_DELIVERIES.
    - A move from a status to itself applies only to items without a live lease (a re-claim
      after the lease ran out, or a waiting item queued again).

    Returns the ids that moved, sorted; the others were moved by someone else and are left
    alone.
    """
    check_item_move(from_status, to_status)
    if not item_ids:
        return []
    values: dict[str, Any] = {"status": to_status, "updated_at": now}
    if new_claim is not None:
        claim_token, lease_seconds = new_claim
        values["lease_token"] = claim_token
        values["lease_until"] = now + timedelta(seconds=lease_seconds)
    else:
        values["lease_token"] = None
        values["lease_until"] = None
    if count_attempt:
        values["attempts"] = Item.attempts + 1
    elif refund_attempt:
        values["attempts"] = case((Item.attempts > 0, Item.attempts - 1), else_=0)
    if _new_stage(from_status, to_status):
        values["attempts"] = 0  # attempts count the claims of the item's current stage
    if to_status == ItemStatus.FAILED:
        values["error_code"] = error_code
        values["error_message"] = message
    elif from_status == ItemStatus.FAILED:  # a retry clears the old error
        values["error_code"] = None
        values["error_message"] = None

    condition: ColumnElement[bool] = Item.status == from_status
    if token is not None:
        condition = condition & (Item.lease_token == token)
    if from_status == to_status:  # only items without a live lease
        condition = condition & or_(Item.lease_until.is_(None), Item.lease_until < now)
    candidates = select(Item.id).where(Item.id.in_(list(item_ids)), condition).order_by(Item.id)
    if is_postgres(session):
        candidates = candidates.with_for_update(skip_locked=True)
    locked = list(session.scalars(candidates))
    if not locked:
        return []
    rows = session.execute(
        update(Item)
        .where(Item.id.in_(locked), condition)
        .values(**values)
        .returning(Item.id, Item.job_id)
    ).all()
    if from_status != to_status:
        per_job: dict[str, int] = {}
        for _, job_id in rows:
            per_job[job_id] = per_job.get(job_id, 0) + 1
        for job_id, n in per_job.items():
            counters.count(session, job_id, from_status, -n)
            counters.count(session, job_id, to_status, n)
    moved = sorted(item_id for item_id, _ in rows)
    if moved:
        session.execute(
            insert(ItemEvent),
            [
                {
                    "item_id": item_id,
                    "from_status": str(from_status),
                    "to_status": str(to_status),
                    "worker": worker,
                    "message": message,
                    "created_at": now,
                }
                for item_id in moved
            ],
        )
    return moved


@dataclass(frozen=True)
class Claim:
    """What `claim` took: the token every later write must carry, the items this caller may
    work on, and those it failed instead (delivered too many times)."""

    token: str
    ids: list[int]
    failed: list[int]


def claim(
    session: Session,
    *,
    item_ids: Sequence[int],
    stage: Stage,
    worker: str,
    lease_seconds: float,
    now: datetime,
    max_attempts: int | None = None,
) -> Claim:
    """Claim items for a stage under a new token: waiting -> working, or re-claim working
    items whose lease ran out (their worker died or hung). Every claim counts as an attempt.
    An item claimed more than `max_attempts` times fails as `internal` instead (a poison item
    that kills its worker must not loop forever; its item_events hold every delivery)."""
    token = uuid.uuid4().hex
    lease = (token, lease_seconds)
    fresh = transition(
        session,
        item_ids=item_ids,
        from_status=stage.waiting,
        to_status=stage.working,
        now=now,
        worker=worker,
        new_claim=lease,
        count_attempt=True,
    )
    reclaimed = transition(
        session,
        item_ids=sorted(set(item_ids) - set(fresh)),
        from_status=stage.working,
        to_status=stage.working,
        now=now,
        worker=worker,
        new_claim=lease,
        count_attempt=True,
        message="lease expired; re-claimed",
    )
    mine = sorted(fresh + reclaimed)
    over: list[int] = []
    if max_attempts is not None and mine:
        over = list(
            session.scalars(select(Item.id).where(Item.id.in_(mine), Item.attempts > max_attempts))
        )
        transition(
            session,
            item_ids=over,
            from_status=stage.working,
            to_status=ItemStatus.FAILED,
            now=now,
            worker=worker,
            token=token,
            error_code="internal",
            message=f"delivered more than {max_attempts} times in stage {stage.name} without "
            "finishing (its worker died or hung each time); item_events holds every delivery",
        )
    return Claim(token=token, ids=[i for i in mine if i not in set(over)], failed=sorted(over))


@dataclass(frozen=True)
class Turn:
    """Whose turn a message of a stage is: `ids` are the waiting items of `job_id` to claim
    (the message's own when it is their job's turn, empty when nothing waits), and
    `deferred` the message's own items left waiting for a later turn."""

    job_id: str | None
    ids: list[int]
    deferred: list[int]


def next_turn(session: Session, *, stage: Stage, item_ids: Sequence[int]) -> Turn:
    """Whose turn a message of `item_ids` (items of one job) is in `stage`: that of the
    running job with items waiting for the stage at the highest priority level, and within a
    level the one whose last turn in the stage (`job_turns`) is oldest (never first; then
    the oldest job). Its job's: the message's own items. Another job's: that job's first
    waiting items, as many as the message holds, locked (SKIP LOCKED: two workers taking a
    turn of the same job get different items); the message's items wait for a later turn.
    Only a message whose items all wait gives its turn away: one sent again for items held
    elsewhere, or delivered twice, settles its own items as it always did (a lapsed lease
    taken over, a held one waited for).

    Small reads: the message's items, the job (over the running jobs' counters, a handful of
    rows) and its items from the (job_id, status, id) index, however many wait in all."""
    mine = session.execute(
        select(Item.job_id, Item.status).where(Item.id.in_(list(item_ids)))
    ).all()
    own = Turn(job_id=mine[0].job_id if mine else None, ids=list(item_ids), deferred=[])
    if len(mine) < len(item_ids) or any(status != stage.waiting for _, status in mine):
        return own  # sent again, or a duplicate: it settles its own items as before
    best = session.scalar(
        select(JobItemCount.job_id)
        .join(Job, Job.id == JobItemCount.job_id)
        .outerjoin(JobTurn, (JobTurn.job_id == JobItemCount.job_id) & (JobTurn.stage == stage.name))
        .where(
            Job.status == JobStatus.RUNNING,
            JobItemCount.status == stage.waiting.value,
            JobItemCount.n > 0,
        )
        .order_by(
            Job.priority.desc(), JobTurn.served_at.asc().nulls_first(), Job.created_at, Job.id
        )
        .limit(1)
    )
    if best is None or best == own.job_id:
        return own
    theirs = (
        select(Item.id)
        .where(Item.job_id == best, Item.status == stage.waiting)
        .order_by(Item.id)
        .limit(len(item_ids))
    )
    if is_postgres(session):
        theirs = theirs.with_for_update(skip_locked=True)
    ids = list(session.scalars(theirs))
    if not ids:  # other workers are taking them right now: this message takes its own
        return own
    return Turn(job_id=best, ids=ids, deferred=list(item_ids))


def served(session: Session, *, job_id: str, stage: Stage, now: datetime) -> None:
    """Record that `job_id` had a turn in `stage` now (its next one waits for the others')."""
    session.execute(
        upsert(session, JobTurn)
        .values(job_id=job_id, stage=stage.name, served_at=now)
        .on_conflict_do_update(index_elements=["job_id", "stage"], set_={"served_at": now})
    )


def held_elsewhere(
    session: Session, *, item_ids: Sequence[int], working: ItemStatus, now: datetime
) -> tuple[list[int], float]:
    """Of `item_ids`, those another worker holds in `working` under a live lease, and the
    seconds until the first of those leases runs out (0 if none)."""
    held: dict[int, datetime] = {}
    for item_id, lease in session.execute(
        select(Item.id, Item.lease_until).where(
            Item.id.in_(list(item_ids)), Item.status == working, Item.lease_until >= now
        )
    ):
        if lease is not None:
            held[item_id] = lease
    if not held:
        return [], 0.0
    return sorted(held), max(0.0, (min(held.values()) - now).total_seconds())


def extend_leases(
    session: Session,
    *,
    item_ids: Sequence[int],
    working: ItemStatus,
    token: str,
    lease_seconds: float,
    now: datetime,
) -> list[int]:
    """The heartbeat: items still held under `token` keep their claim for `lease_seconds`
    more. Returns those; the others were taken over (or finished) and are no longer ours."""
    if not item_ids:
        return []
    rows = session.execute(
        update(Item)
        .where(Item.id.in_(list(item_ids)), Item.status == working, Item.lease_token == token)
        .values(lease_until=now + timedelta(seconds=lease_seconds))
        .returning(Item.id)
    )
    return sorted(item_id for (item_id,) in rows)


def still_held(
    session: Session, *, item_ids: Sequence[int], working: ItemStatus, token: str
) -> list[int]:
    """Of `item_ids`, those still held under `token` (checked before uploading anything)."""
    if not item_ids:
        return []
    return sorted(
        session.scalars(
            select(Item.id).where(
                Item.id.in_(list(item_ids)), Item.status == working, Item.lease_token == token
            )
        )
    )


def expired_leases(
    session: Session, *, working: ItemStatus, now: datetime, limit: int = 1000
) -> list[int]:
    """Items in `working` whose lease ran out: their worker died or lost its connection."""
    return list(
        session.scalars(
            select(Item.id)
            .where(Item.status == working, Item.lease_until < now)
            .order_by(Item.id)
            .limit(limit)
        )
    )


def stale_waiting(
    session: Session, *, waiting: ItemStatus, idle_seconds: float, now: datetime, limit: int = 1000
) -> list[int]:
    """Items in `waiting` that have not moved for `idle_seconds`: if their stage's queue is
    empty, their message was lost (a broker restart, a publish that failed for good)."""
    cutoff = now - timedelta(seconds=idle_seconds)
    return list(
        session.scalars(
            select(Item.id)
            .where(Item.status == waiting, Item.updated_at < cutoff)
            .order_by(Item.id)
            .limit(limit)
        )
    )


def load_items(session: Session, *, item_ids: Sequence[int]) -> list[Item]:
    return list(session.scalars(select(Item).where(Item.id.in_(list(item_ids))).order_by(Item.id)))


def max_row_index(session: Session, *, job_id: str) -> int:
    """The last manifest row a (resumed) ingest recorded; -1 for none."""
    value = session.scalar(select(func.max(Item.row_index)).where(Item.job_id == job_id))
    return -1 if value is None else int(value)


def iter_id_pages(
    session: Session, *, job_id: str, statuses: Iterable[ItemStatus], page_size: int = 1000
) -> Iterator[list[int]]:
    """Ids of a job's items in the given statuses, in id order, a page at a time (keyset
    paging, so a job of a million items never sits in memory or in one IN list)."""
    wanted, after = list(statuses), 0
    while True:
        ids = list(
            session.scalars(
                select(Item.id)
                .where(Item.job_id == job_id, Item.status.in_(wanted), Item.id > after)
                .order_by(Item.id)
                .limit(page_size)
            )
        )
        if not ids:
            return
        yield ids
        after = ids[-1]


def all_ids(session: Session, *, job_id: str, status: ItemStatus) -> list[int]:
    return [i for page in iter_id_pages(session, job_id=job_id, statuses=[status]) for i in page]


def release_all_held(
    session: Session, *, job_id: str, worker: str, message: str, now: datetime
) -> int:
    """Every item of the job a stage holds goes back to waiting, whoever holds it: for the
    one-machine runner, which holds the only lock on its ledger (a killed run left them)."""
    released = 0
    for stage in STAGES:
        released += len(
            transition(
                session,
                item_ids=all_ids(session, job_id=job_id, status=stage.working),
                from_status=stage.working,
                to_status=stage.waiting,
                now=now,
                worker=worker,
                message=message,
            )
        )
    return released
