"""Recording an item's images, in the transaction that marks it succeeded; reading them back
to verify them, a page at a time; forgetting them when an item is made again."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from storage.models import Item, ItemStatus, Output, OutputAttempt


def record(
    session: Session,
    *,
    item_id: int,
    outputs: Sequence[dict[str, Any]],
    now: datetime,
    warning: str | None = None,
    attempts: Sequence[dict[str, Any]] = (),
) -> None:
    """Record an item's images (and the warning it succeeded with, and every attempt a score
    threshold asked for). Called in the transaction that marks the item succeeded, which is
    guarded by the item's claim: a worker that lost its claim records nothing."""
    if warning:
        session.execute(update(Item).where(Item.id == item_id).values(warning=warning))
    if outputs:
        session.execute(
            insert(Output), [{"item_id": item_id, "created_at": now, **out} for out in outputs]
        )
    if attempts:  # every image generated for a slot, when a score threshold asked for more
        session.execute(
            insert(OutputAttempt),
            [{"item_id": item_id, "created_at": now, **row} for row in attempts],
        )


def of_job(session: Session, *, job_id: str) -> list[Output]:
    return list(
        session.scalars(
            select(Output)
            .join(Item, Item.id == Output.item_id)
            .where(Item.job_id == job_id)
            .order_by(Output.item_id, Output.image_index)
        )
    )


@dataclass(frozen=True)
class Recorded:
    """One outputs row as `ipbatch verify` checks it."""

    output_id: int
    item_id: int
    row_id: str | None
    uri: str
    sha256: str
    size: int | None  # NULL for rows recorded before revision 0010


def pages_of_job(
    session: Session, *, job_id: str, page_size: int = 1000
) -> Iterator[list[Recorded]]:
    """The outputs of a job's succeeded items, in pages ordered by id (keyset pagination:
    a million rows are never held at once)."""
    after = 0
    while True:
        rows = session.execute(
            select(Output.id, Output.item_id, Item.row_id, Output.uri, Output.sha256, Output.size)
            .join(Item, Item.id == Output.item_id)
            .where(Item.job_id == job_id, Item.status == ItemStatus.SUCCEEDED, Output.id > after)
            .order_by(Output.id)
            .limit(page_size)
        ).all()
        if not rows:
            return
        yield [Recorded(*row) for row in rows]
        after = rows[-1][0]


def forget(session: Session, *, item_ids: Sequence[int]) -> None:
    """Delete the outputs (and score attempts) recorded for these items: they are being made
    again, and record afresh in the transaction that marks them succeeded."""
    ids = list(item_ids)
    session.execute(delete(Output).where(Output.item_id.in_(ids)))
    session.execute(delete(OutputAttempt).where(OutputAttempt.item_id.in_(ids)))
