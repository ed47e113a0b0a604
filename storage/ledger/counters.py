"""Per-job status counters (`job_item_counts`), kept in the same transaction as every item move.

`job_progress` reads a handful of rows instead of counting a million items. The deltas are
gathered on the session and written just before commit, in sorted key order: two workers
finishing batches of the same job then lock the counter rows in the same order (no deadlock),
and only for the instant before their commit.
"""

from __future__ import annotations

from sqlalchemy import delete, event, func, insert, select
from sqlalchemy.orm import Session

from storage.ledger.db import upsert
from storage.models import Item, ItemStatus, JobItemCount

_DELTAS = "ipbatch_count_deltas"


def count(session: Session, job_id: str, status: ItemStatus, delta: int) -> None:
    """Add `delta` to the job's count of items in `status`, at commit."""
    deltas: dict[tuple[str, str], int] | None = session.info.get(_DELTAS)
    if deltas is None:
        deltas = session.info[_DELTAS] = {}
        event.listen(session, "before_commit", _apply)
        event.listen(session, "after_rollback", _drop)
    key = (job_id, status.value)
    deltas[key] = deltas.get(key, 0) + delta


def _drop(session: Session) -> None:
    session.info.get(_DELTAS, {}).clear()


def _apply(session: Session) -> None:
    deltas: dict[tuple[str, str], int] = session.info.get(_DELTAS, {})
    pending = sorted((key, n) for key, n in deltas.items() if n != 0)
    deltas.clear()
    if not pending:
        return
    for (job_id, status), n in pending:
        statement = upsert(session, JobItemCount).values(job_id=job_id, status=status, n=n)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["job_id", "status"], set_={"n": JobItemCount.n + n}
            )
        )


def item_counts(session: Session, *, job_id: str) -> dict[ItemStatus, int]:
    """Items of a job per status, from the counters (this session's own moves included)."""
    _apply(session)
    rows = session.execute(
        select(JobItemCount.status, JobItemCount.n).where(
            JobItemCount.job_id == job_id, JobItemCount.n != 0
        )
    )
    return {ItemStatus(status): int(n) for status, n in rows}


def recount(session: Session, *, job_id: str) -> dict[ItemStatus, int]:
    """Rebuild a job's counters from its items (a repair tool: the ledger keeps them exact;
    anything that writes `items.status` by hand does not)."""
    session.execute(delete(JobItemCount).where(JobItemCount.job_id == job_id))
    counts = {
        ItemStatus(status): int(n)
        for status, n in session.execute(
            select(Item.status, func.count()).where(Item.job_id == job_id).group_by(Item.status)
        )
    }
    if counts:
        session.execute(
            insert(JobItemCount),
            [{"job_id": job_id, "status": s.value, "n": n} for s, n in counts.items()],
        )
    return counts
