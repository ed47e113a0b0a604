"""Recording items' images, in the transaction that marks them succeeded; reading them back
to verify them, a page at a time; forgetting them when an item is made again."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from storage.models import Item, ItemStatus, Output, OutputAttempt


@dataclass(frozen=True)
class ItemOutputs:
    """What one item made: its images' `outputs` rows, the warning it succeeded with, and
    every attempt a score threshold asked for."""

    outputs: Sequence[dict[str, Any]]
    warning: str | None = None
    attempts: Sequence[dict[str, Any]] = ()


def record(session: Session, *, made: Mapping[int, ItemOutputs], now: datetime) -> None:
    """Record the images of several items (item id -> what it made), a statement per table.
    Called in the transaction that marks the items succeeded, which is guarded by their
    claim: a worker that lost its claim records nothing."""
    for item_id, item in made.items():
        if item.warning:
            session.execute(update(Item).where(Item.id == item_id).values(warning=item.warning))
    rows = [
        {"item_id": item_id, "created_at": now, **out}
        for item_id, item in made.items()
        for out in item.outputs
    ]
    if rows:
        session.execute(insert(Output), rows)
    tried = [
        {"item_id": item_id, "created_at": now, **row}
        for item_id, item in made.items()
        for row in item.attempts
    ]
    if tried:  # every image generated for a slot, when a score threshold asked for more
        session.execute(insert(OutputAttempt), tried)


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
