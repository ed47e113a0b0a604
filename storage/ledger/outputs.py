"""Recording an item's images, in the transaction that marks it succeeded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from storage.models import Item, Output, OutputAttempt


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
