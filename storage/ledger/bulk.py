"""Loading a manifest's rows as items, a chunk at a time (COPY on PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from storage.ledger import counters
from storage.ledger.db import is_postgres
from storage.models import Item, ItemEvent, ItemStatus


def add_items(
    session: Session, *, job_id: str, rows: Sequence[dict[str, Any]], now: datetime
) -> list[int]:
    """Insert items (dicts with row_id, row_index, status, params, error_code, error_message;
    params a dict, or its JSON text as an ingest writes it).

    Returns the ids of the rows inserted as pending, in order. One event per item.
    On PostgreSQL the rows go in with COPY (5x faster than INSERT for a 100k-row manifest);
    elsewhere as one bulk INSERT.
    """
    if not rows:
        return []
    values = [
        {
            "job_id": job_id,
            "row_id": r["row_id"],
            "row_index": r["row_index"],
            "status": ItemStatus(r["status"]),
            "params": r.get("params"),
            "error_code": r.get("error_code"),
            "error_message": r.get("error_message"),
            "attempts": 0,
            "updated_at": now,
        }
        for r in rows
    ]
    if is_postgres(session):
        ids = _copy_items(session, values)
    else:
        for v in values:  # SQLAlchemy's JSON type serializes
            if isinstance(v["params"], str):
                v["params"] = json.loads(v["params"])
        ids = list(
            session.scalars(insert(Item).returning(Item.id, sort_by_parameter_order=True), values)
        )
        session.execute(
            insert(ItemEvent),
            [
                {
                    "item_id": item_id,
                    "from_status": None,
                    "to_status": str(v["status"]),
                    "worker": None,
                    "message": v["error_message"],
                    "created_at": now,
                }
                for item_id, v in zip(ids, values, strict=True)
            ],
        )
    for status in {v["status"] for v in values}:
        counters.count(session, job_id, status, sum(1 for v in values if v["status"] == status))
    return [i for i, v in zip(ids, values, strict=True) if v["status"] == ItemStatus.PENDING]


_ITEM_COLUMNS = (
    "id, job_id, row_id, row_index, status, params, error_code, error_message, attempts, updated_at"
)


def _copy_items(session: Session, values: list[dict[str, Any]]) -> list[int]:
    """COPY items and their first events in the session's transaction; ids are taken from the
    items sequence first, so the caller learns them without a RETURNING."""
    ids = [
        int(i)
        for i in session.scalars(
            select(func.nextval(func.pg_get_serial_sequence("items", "id"))).select_from(
                func.generate_series(1, len(values))
            )
        )
    ]
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY items ({_ITEM_COLUMNS}) FROM STDIN") as copy:
        for item_id, v in zip(ids, values, strict=True):
            params = v["params"]
            if params is not None and not isinstance(params, str):
                params = json.dumps(params)
            copy.write_row(
                (
                    item_id,
                    v["job_id"],
                    v["row_id"],
                    v["row_index"],
                    v["status"].value,
                    params,
                    v["error_code"],
                    v["error_message"],
                    0,
                    v["updated_at"],
                )
            )
    # each item's first event, written by the server from the rows just copied
    cursor.execute(
        "INSERT INTO item_events (item_id, from_status, to_status, worker, message, created_at) "
        "SELECT id, NULL, status, NULL, error_message, updated_at FROM items "
        "WHERE id BETWEEN %s AND %s AND id = ANY(%s) ORDER BY id",
        (min(ids), max(ids), ids),
    )
    return ids
