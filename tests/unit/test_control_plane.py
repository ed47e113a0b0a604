"""What a message costs the ledger does not grow with its items: the embed and generate
stages write a message's items in one transaction, a statement per table, not per item
(bench/fleet.py measures the rate a fleet gets from it; this pins the shape)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers.jobs import ingest_job, local_context, write_manifest

from workers.context import StageContext
from workers.stages import embed, generate


@pytest.fixture()
def ctx(tmp_path: Path, tiny_models: Path) -> Iterator[StageContext]:
    # a lease of an hour: no heartbeat statement lands in the counts
    context = local_context(tmp_path / "home", tiny_models, lease_seconds=3600)
    yield context
    context.close()


class Statements:
    def __init__(self) -> None:
        self.sent: list[str] = []


@contextmanager
def statements(engine: sa.Engine) -> Iterator[Statements]:
    """Every SQL statement sent on `engine` while the block runs."""
    seen = Statements()

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.sent.append(statement.split(None, 1)[0].upper())

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def _items(ctx: StageContext, where: Path, reference: Path, rows: int) -> list[int]:
    """A job of `rows` rows on one reference, each its own generation (seed), ingested."""
    manifest = write_manifest(
        where.with_suffix(".jsonl"),
        [
            {"id": f"r{i}", "reference": str(reference), "steps": 1, "seed": 100 * rows + i}
            for i in range(rows)
        ],
    )
    return ingest_job(ctx, manifest=manifest, output=where)[1]


def test_a_message_of_8_items_costs_the_ledger_what_one_of_2_does(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path]
) -> None:
    # the reference's embedding cached and the pipeline warm first: both messages find them
    warm = _items(ctx, tmp_path / "warm", reference_images["red"], 1)
    [warm] = embed.run(ctx, item_ids=warm).ready
    assert generate.run(ctx, item_ids=[warm]).succeeded == 1
    sent = {}
    for n in (2, 8):
        ids = _items(ctx, tmp_path / f"job{n}", reference_images["red"], n)
        with statements(ctx.engine) as embedding:
            ready = embed.run(ctx, item_ids=ids).ready
        with statements(ctx.engine) as generating:
            assert generate.run(ctx, item_ids=ready).succeeded == n
        sent[n] = (embedding.sent, generating.sent)
    # the same statements, whatever the number of items (per item they were: a transaction
    # moving it, its links or its outputs, its events, its claim checked)
    assert sent[8] == sent[2]
