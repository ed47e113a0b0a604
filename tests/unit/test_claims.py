"""The one claim scope: however a stage's block ends, every item it claimed is finished,
failed or given back, and a worker that lost its claim writes nothing. Time is a ManualClock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.clock import ManualClock
from helpers.jobs import ingest_job, local_context, write_manifest

from core.errors import ConfigError, ErrorCode, ItemError, RetryableError
from storage.ledger import items
from storage.lifecycle import EMBED
from storage.models import ItemEvent, ItemStatus
from workers import metrics
from workers.claims import claimed
from workers.context import StageContext

LEASE = 5


@pytest.fixture()
def ctx(tmp_path: Path, tiny_models: Path, clock: ManualClock) -> Iterator[StageContext]:
    context = local_context(tmp_path / "home", tiny_models, lease_seconds=LEASE, clock=clock)
    yield context
    context.close()


@pytest.fixture()
def ids(ctx: StageContext, tmp_path: Path) -> list[int]:
    rows = [{"id": f"r{i}", "reference": "x.png"} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    return ingest_job(ctx, manifest=manifest, output=tmp_path / "out")[1]


def state(ctx: StageContext, ids: list[int]) -> list[tuple[str, int, str | None]]:
    """(status, attempts, error code) of each item."""
    with ctx.sessions.begin() as s:
        return [
            (str(i.status), i.attempts, i.error_code) for i in items.load_items(s, item_ids=ids)
        ]


def last_messages(ctx: StageContext, ids: list[int]) -> list[str | None]:
    with ctx.sessions.begin() as s:
        return [
            s.scalar(
                sa.select(ItemEvent.message)
                .where(ItemEvent.item_id == i)
                .order_by(ItemEvent.id.desc())
                .limit(1)
            )
            for i in ids
        ]


def test_an_outage_half_way_gives_every_open_item_back_at_once(
    ctx: StageContext, ids: list[int]
) -> None:
    """One item done, then S3 goes away: the three others go back to waiting together, their
    claims refunded (an outage is not a delivery), and the error goes on to the caller."""
    with pytest.raises(RetryableError), claimed(ctx, EMBED, ids) as work:
        assert work.ids == ids
        work.done(ids[:1])
        raise RetryableError("S3 unreachable for s3://b/k", dependency="s3")
    assert state(ctx, ids) == [("ready", 0, None)] + [("pending", 0, None)] * 3
    assert last_messages(ctx, ids[1:]) == ["retrying: S3 unreachable for s3://b/k"] * 3


def test_a_configuration_error_gives_the_items_back(ctx: StageContext, ids: list[int]) -> None:
    with pytest.raises(ConfigError), claimed(ctx, EMBED, ids):
        raise ConfigError("no base model at /models/stable-diffusion-v1-5")
    assert state(ctx, ids) == [("pending", 0, None)] * 4
    assert all("configuration" in (m or "") for m in last_messages(ctx, ids))


def test_a_bug_fails_the_open_items_with_its_message(ctx: StageContext, ids: list[int]) -> None:
    with pytest.raises(ZeroDivisionError), claimed(ctx, EMBED, ids) as work:
        work.done(ids[:2])
        _ = 1 / 0
    assert state(ctx, ids) == [("ready", 0, None)] * 2 + [("failed", 1, "internal")] * 2
    assert all("ZeroDivisionError" in (m or "") for m in last_messages(ctx, ids[2:]))


def test_an_item_error_fails_that_item_alone(ctx: StageContext, ids: list[int]) -> None:
    with claimed(ctx, EMBED, ids) as work:
        for item_id in work.ids:
            with work.item(item_id):
                if item_id == ids[1]:
                    raise ItemError(ErrorCode.NO_FACE, "no face in the reference")
                work.done([item_id])
    assert [s for s, _, _ in state(ctx, ids)] == ["ready", "failed", "ready", "ready"]
    assert last_messages(ctx, ids[1:2]) == ["no face in the reference"]


def test_items_a_stage_leaves_open_are_released(ctx: StageContext, ids: list[int]) -> None:
    with claimed(ctx, EMBED, ids) as work:
        work.done(ids[:1])
    assert state(ctx, ids) == [("ready", 0, None)] + [("pending", 0, None)] * 3
    assert last_messages(ctx, ids[1:2]) == ["released: the stage left it unfinished (a bug)"]


def test_the_process_stopping_gives_the_items_back(ctx: StageContext, ids: list[int]) -> None:
    with pytest.raises(KeyboardInterrupt), claimed(ctx, EMBED, ids):
        raise KeyboardInterrupt
    assert state(ctx, ids) == [("pending", 0, None)] * 4


def _fenced() -> float:
    return metrics.FENCED.labels(EMBED.name)._value.get()


def test_a_worker_whose_claim_was_taken_over_writes_nothing(
    ctx: StageContext, ids: list[int], clock: ManualClock
) -> None:
    """Worker A pauses past its lease; B takes the items over. A's finishing, failing and
    giving back all change nothing (and are counted); B's work stands."""
    before = _fenced()
    with pytest.raises(RetryableError), claimed(ctx, EMBED, ids) as a:
        clock.advance(LEASE + 1)  # A is paused (a GC pause, a stopped VM) ...
        with ctx.sessions.begin() as s:  # ... and B takes over
            b = items.claim(s, item_ids=ids, stage=EMBED, worker="b", lease_seconds=60, now=clock())
        assert b.ids == ids
        assert a.done(ids[:1]) == []  # A comes back and finishes one: refused
        assert a.fail(ids[1:2], classify_no_face()) == []  # fails one: refused
        assert a.still_held(ids[2:3]) == []  # checks before uploading: not its any more
        raise RetryableError("S3 unreachable", dependency="s3")  # gives the rest back: refused
    assert _fenced() - before == 4
    with ctx.sessions.begin() as s:
        got = items.load_items(s, item_ids=ids)
        assert {(i.status, i.lease_token, i.attempts) for i in got} == {(EMBED.working, b.token, 2)}
        assert (
            items.transition(
                s,
                item_ids=ids,
                from_status=EMBED.working,
                to_status=EMBED.next,
                now=clock(),
                token=b.token,
            )
            == ids
        )


def classify_no_face():  # type: ignore[no-untyped-def]
    from core.errors import classify

    return classify(ItemError(ErrorCode.NO_FACE, "no face"))


def test_the_heartbeat_notices_a_lost_claim(
    ctx: StageContext, ids: list[int], clock: ManualClock
) -> None:
    """A's heartbeat (every LEASE / 3 s) finds its items taken over and lets them go: A then
    holds nothing, and writes nothing for them."""
    with claimed(ctx, EMBED, ids) as a:
        clock.advance(LEASE + 1)
        with ctx.sessions.begin() as s:
            items.claim(s, item_ids=ids, stage=EMBED, worker="b", lease_seconds=60, now=clock())
        deadline = time.monotonic() + 30
        while a.open and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a.open == []
    assert [s for s, _, _ in state(ctx, ids)] == ["embedding"] * 4  # B's, untouched


def test_items_held_elsewhere_are_reported_not_claimed(
    ctx: StageContext, ids: list[int], clock: ManualClock
) -> None:
    with ctx.sessions.begin() as s:
        items.claim(s, item_ids=ids[:2], stage=EMBED, worker="b", lease_seconds=10, now=clock())
    with claimed(ctx, EMBED, ids) as work:
        assert (work.ids, work.held, work.retry_in) == (ids[2:], ids[:2], 10)
        work.done(work.ids)
    assert [s for s, _, _ in state(ctx, ids)] == ["embedding"] * 2 + ["ready"] * 2
    assert ItemStatus.READY == EMBED.next
