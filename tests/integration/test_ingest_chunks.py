"""An ingest records its chunks on a writer thread while it reads the next ones: a chunk
that fails must leave the manifest's first rows recorded, none after, and a resumed ingest
must record the rest once each and send every item on."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers.jobs import local_context, write_manifest
from sqlalchemy import select

from storage.ledger import bulk, counters
from storage.lifecycle import Stage
from storage.models import Item, ItemEvent, ItemStatus
from workers.stages import ingest, jobs

ROWS = 50  # five chunks of ten; every seventh row invalid
CHUNK = 10


def _manifest(path: Path) -> Path:
    rows: list[dict[str, Any]] = []
    for i in range(ROWS):
        row: dict[str, Any] = {"id": f"r{i}", "reference": f"ref{i % 3}.png", "prompt": "é"}
        rows.append(row | {"steps": 0} if i % 7 == 6 else row)
    return write_manifest(path, rows)


def test_a_chunk_that_fails_stops_the_later_ones_and_the_resume_finishes(
    ledger_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = local_context(
        tmp_path / "home",
        tmp_path / "models",
        database_url=ledger_engine.url.render_as_string(hide_password=False),
        ingest_chunk=CHUNK,
        embed_batch=4,
    )
    sent: list[tuple[str, list[int]]] = []

    def send(stage: Stage, ids: list[int]) -> None:
        sent.append((stage.name, ids))

    # the third chunk's write fails once the fourth chunk has been read (the reader is ahead
    # of the writer, as it is when the ledger is the slower one)
    fourth_read = threading.Event()
    add_items, item_values = bulk.add_items, ingest._item_values
    calls = []

    def reading(parsed: Any) -> dict[str, Any]:
        if parsed.index == 4 * CHUNK - 1:
            fourth_read.set()
        return item_values(parsed)

    def failing_third(session: Any, **kwargs: Any) -> list[int]:
        calls.append(kwargs["rows"][0]["row_index"])
        if len(calls) == 3:
            assert fourth_read.wait(30)
            raise sa.exc.OperationalError("COPY items", {}, ConnectionError("server went away"))
        return add_items(session, **kwargs)

    monkeypatch.setattr(ingest, "_item_values", reading)
    monkeypatch.setattr(bulk, "add_items", failing_third)
    manifest = str(_manifest(tmp_path / "m.jsonl"))
    job_id, _ = jobs.register(ctx, manifest_uri=manifest, output_uri="o")
    with pytest.raises(sa.exc.OperationalError):
        ingest.run(ctx, job_id=job_id, send=send)

    with ctx.sessions.begin() as session:
        recorded = session.scalars(select(Item.row_index).where(Item.job_id == job_id)).all()
    assert sorted(recorded) == list(range(2 * CHUNK)), "the first two chunks, nothing after"
    assert calls == [0, CHUNK, 2 * CHUNK], "no chunk was written after the one that failed"

    # the outage is over: the ingest runs again (the claim was given back) and finishes
    monkeypatch.setattr(bulk, "add_items", add_items)
    summary = ingest.run(ctx, job_id=job_id, send=send)
    assert (summary.rows, summary.skipped) == (ROWS, 2 * CHUNK)
    with ctx.sessions.begin() as session:
        items = session.execute(
            select(Item.id, Item.row_index, Item.status, Item.params).where(Item.job_id == job_id)
        ).all()
        events = session.scalar(
            select(sa.func.count()).select_from(ItemEvent).join(Item).where(Item.job_id == job_id)
        )
        counts = counters.item_counts(session, job_id=job_id)
    assert sorted(i.row_index for i in items) == list(range(ROWS)), "each row once, no gap"
    invalid = [i for i in items if i.row_index % 7 == 6]
    assert {i.status for i in invalid} == {ItemStatus.FAILED}
    pending = {i.id for i in items if i.status == ItemStatus.PENDING}
    assert len(pending) == ROWS - len(invalid)
    assert events == ROWS, "one first event per item"
    assert counts == {ItemStatus.PENDING: len(pending), ItemStatus.FAILED: len(invalid)}
    assert {i.params["prompt"] for i in items if i.id in pending} == {"é"}
    # every pending item went to the embed stage (what the first run recorded but could not
    # send, the resume sent), in messages of at most IPBATCH_EMBED_BATCH
    assert {stage for stage, _ in sent} == {"embed"}
    assert {i for _, ids in sent for i in ids} == pending
    assert max(len(ids) for _, ids in sent) == 4
    ctx.close()
