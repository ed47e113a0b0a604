"""The embedding cache's index (`embeddings`) and each item's links to it: its reference
embeddings (`item_embeddings`) and its prepared structure inputs (`item_inputs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from storage.ledger.db import is_postgres
from storage.models import Embedding, ItemEmbedding, ItemInput


def find(session: Session, *, content_sha256: str, encoder: str, kind: str) -> Embedding | None:
    return session.scalar(
        select(Embedding).where(
            Embedding.content_sha256 == content_sha256,
            Embedding.encoder == encoder,
            Embedding.kind == kind,
        )
    )


def lock_key(session: Session, *, content_sha256: str, encoder: str, kind: str) -> bool:
    """PostgreSQL: hold a lock on this key until the transaction ends, so that two workers
    missing the same key at once compute it once (the second finds it when the lock is its).
    Waits at most `LOCK_WAIT`; False if it gave up (a worker stopped mid-computation holds
    it: compute anyway rather than wait for ever). SQLite: one writer anyway, True."""
    if not is_postgres(session):
        return True
    session.execute(text(f"SET LOCAL lock_timeout = '{int(LOCK_WAIT * 1000)}ms'"))
    try:
        with session.begin_nested():
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                {"key": f"{content_sha256}|{encoder}|{kind}"},
            )
    except OperationalError:  # lock_timeout
        return False
    finally:
        session.execute(text("SET LOCAL lock_timeout = 0"))
    return True


LOCK_WAIT = 30.0  # seconds


def record(
    session: Session,
    *,
    content_sha256: str,
    encoder: str,
    kind: str,
    uri: str,
    shape: list[int],
    dtype: str,
    now: datetime,
) -> int:
    """Insert the embedding row, or return the existing one's id (another worker won)."""
    try:
        with session.begin_nested():
            row = Embedding(
                content_sha256=content_sha256,
                encoder=encoder,
                kind=kind,
                uri=uri,
                shape=shape,
                dtype=dtype,
                created_at=now,
            )
            session.add(row)
            session.flush()
            return row.id
    except IntegrityError:
        existing = find(session, content_sha256=content_sha256, encoder=encoder, kind=kind)
        assert existing is not None
        return existing.id


def link(session: Session, *, links: Mapping[int, Sequence[dict[str, Any]]]) -> None:
    """Replace each item's (adapter_index, reference_index) -> embedding links (item id ->
    its links): one delete and one insert for all of them."""
    _replace(session, ItemEmbedding, links)


def of_items(
    session: Session, *, item_ids: Sequence[int]
) -> dict[int, list[tuple[ItemEmbedding, Embedding]]]:
    """Each item's embeddings, in (adapter, reference) order (an item without any: [])."""
    rows = session.execute(
        select(ItemEmbedding, Embedding)
        .join(Embedding, Embedding.id == ItemEmbedding.embedding_id)
        .where(ItemEmbedding.item_id.in_(list(item_ids)))
        .order_by(ItemEmbedding.item_id, ItemEmbedding.adapter_index, ItemEmbedding.reference_index)
    )
    return _by_item(item_ids, rows)


def link_inputs(session: Session, *, links: Mapping[int, Sequence[dict[str, Any]]]) -> None:
    """Replace each item's (role, owner_index, position) -> prepared input links."""
    _replace(session, ItemInput, links)


def inputs_of_items(
    session: Session, *, item_ids: Sequence[int]
) -> dict[int, list[tuple[ItemInput, Embedding]]]:
    """Each item's prepared inputs, in (role, owner, position) order (none: [])."""
    rows = session.execute(
        select(ItemInput, Embedding)
        .join(Embedding, Embedding.id == ItemInput.embedding_id)
        .where(ItemInput.item_id.in_(list(item_ids)))
        .order_by(ItemInput.item_id, ItemInput.role, ItemInput.owner_index, ItemInput.position)
    )
    return _by_item(item_ids, rows)


def _by_item(item_ids: Sequence[int], rows: Any) -> dict[int, list[Any]]:
    """(link, embedding) rows grouped by the link's item, in their order; [] for none."""
    found: dict[int, list[Any]] = {i: [] for i in item_ids}
    for item_link, embedding in rows:
        found[item_link.item_id].append((item_link, embedding))
    return found


def _replace(
    session: Session,
    table: type[ItemEmbedding] | type[ItemInput],
    links: Mapping[int, Sequence[dict[str, Any]]],
) -> None:
    if not links:
        return
    session.execute(delete(table).where(table.item_id.in_(list(links))))
    rows = [
        {"item_id": item_id, **row} for item_id, item_links in links.items() for row in item_links
    ]
    if rows:
        session.execute(insert(table), rows)
