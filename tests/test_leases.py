"""Claims are leases: the heartbeat renews a live worker's, the reaper takes back a dead
worker's and queues its items again."""

from __future__ import annotations

import functools
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core.config import Settings
from core.errors import RetryableError
from storage import ledger
from storage.migrate import upgrade
from storage.models import Item, ItemEvent, ItemStatus, Output, utcnow
from workers import stages
from workers.context import StageContext


@pytest.fixture()
def ctx(tmp_path: Path, tiny_models: Path) -> StageContext:
    settings = Settings(home=tmp_path / "home", models=str(tiny_models), lease_seconds=5)
    upgrade(settings.ledger_url())
    context = StageContext.create(settings, mode="local")
    yield context  # type: ignore[misc]
    context.close()


def _job(ctx: StageContext, tmp_path: Path, reference: Path, rows: int) -> list[int]:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "reference": str(reference), "steps": 1}) + "\n"
            for i in range(rows)
        )
    )
    job_id, _ = stages.register_job(ctx, manifest_uri=str(manifest), output_uri=str(tmp_path / "o"))
    queued: list[int] = []
    stages.ingest(ctx, job_id=job_id, enqueue=queued.extend)
    return queued


def test_reaper_requeues_only_what_dead_workers_held(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path]
) -> None:
    ids = _job(ctx, tmp_path, reference_images["red"], rows=5)
    claim = {"worker": "w", "max_attempts": 5}
    assert stages.embed(ctx, item_ids=ids[:2]).ready == ids[:2]
    with ctx.sessions.begin() as s:
        # r0, r1: generating; r2: embedding; r3: embedding under a live lease; r4: pending
        for item_ids, waiting, working, lease in (
            (ids[:2], ItemStatus.READY, ItemStatus.RUNNING, 0.01),
            (ids[2:3], ItemStatus.PENDING, ItemStatus.EMBEDDING, 0.01),
            (ids[3:4], ItemStatus.PENDING, ItemStatus.EMBEDDING, 60),
        ):
            ledger.claim(
                s, item_ids=item_ids, waiting=waiting, working=working, lease_seconds=lease, **claim
            )
    time.sleep(0.05)
    embeds: list[list[int]] = []
    generates: list[list[int]] = []
    assert stages.reap(ctx, enqueue_embed=embeds.append, enqueue_generate=generates.append) == 3
    assert embeds == [ids[2:3]] and generates == [ids[:2]]
    with ctx.sessions.begin() as s:
        statuses = [i.status for i in ledger.load_items(s, item_ids=ids)]
        reaped = s.scalar(
            sa.select(sa.func.count()).where(
                ItemEvent.message == "lease expired: released by the reaper"
            )
        )
    assert statuses == [
        ItemStatus.READY,
        ItemStatus.READY,
        ItemStatus.PENDING,
        ItemStatus.EMBEDDING,  # its worker is alive
        ItemStatus.PENDING,
    ]
    assert reaped == 3
    assert stages.reap(ctx, enqueue_embed=embeds.append, enqueue_generate=generates.append) == 0
    # the requeued items run to the end like any other
    ready = stages.embed(ctx, item_ids=ids[2:3] + ids[4:]).ready
    assert stages.generate(ctx, item_ids=ids[:2] + ready).succeeded == 4


def test_heartbeat_keeps_a_long_batch_claimed(
    ctx: StageContext,
    tmp_path: Path,
    reference_images: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch that runs longer than the lease (5 s here) keeps its items: the heartbeat
    renews the lease, so no other worker may take them over meanwhile."""
    ids = _job(ctx, tmp_path, reference_images["red"], rows=2)
    ready = stages.embed(ctx, item_ids=ids).ready
    real_run_batch = stages._run_batch
    seen: list[tuple[float, list[int]]] = []

    def slow(ctx_, batch):  # type: ignore[no-untyped-def]
        for _ in range(3):  # 6 s in all, longer than the lease
            time.sleep(2)
            with ctx.sessions.begin() as s:
                lease = s.scalar(sa.select(sa.func.min(Item.lease_until)).where(Item.id.in_(ready)))
                stolen = ledger.claim(
                    s,
                    item_ids=ready,
                    waiting=ItemStatus.READY,
                    working=ItemStatus.RUNNING,
                    worker="thief",
                    lease_seconds=60,
                )
            assert lease is not None
            seen.append((lease.timestamp() - time.time(), stolen))
        return real_run_batch(ctx_, batch)

    monkeypatch.setattr(stages, "_run_batch", slow)
    assert stages.generate(ctx, item_ids=ready).succeeded == 2
    assert all(left > 0 and stolen == [] for left, stolen in seen), seen


def test_an_image_stored_by_an_earlier_attempt_is_kept_and_recorded(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path]
) -> None:
    """A worker died after uploading an image but before recording it: the next attempt finds
    the key taken, keeps that image and records its checksum; one version per key, always."""
    import hashlib

    ids = _job(ctx, tmp_path, reference_images["red"], rows=2)
    ready = stages.embed(ctx, item_ids=ids).ready
    with ctx.sessions.begin() as s:
        [item] = ledger.load_items(s, item_ids=ready[:1])
        job_id = item.job_id
    earlier = tmp_path / "o" / job_id / "r0" / "0.png"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"the image an earlier attempt stored")
    assert stages.generate(ctx, item_ids=ready).succeeded == 2
    with ctx.sessions.begin() as s:
        shas = dict(
            s.execute(
                sa.select(Item.row_id, Output.sha256).join(Output, Output.item_id == Item.id)
            ).all()
        )
    assert earlier.read_bytes() == b"the image an earlier attempt stored"
    assert shas["r0"] == hashlib.sha256(earlier.read_bytes()).hexdigest()
    other = (tmp_path / "o" / job_id / "r1" / "0.png").read_bytes()
    assert shas["r1"] == hashlib.sha256(other).hexdigest()


def test_reaper_queues_again_items_whose_message_was_lost(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path]
) -> None:
    """Items waiting for a stage, unmoved for IPBATCH_REQUEUE_AFTER, are queued again once
    that stage's queue is empty (their message is gone), and only then."""
    ids = _job(ctx, tmp_path, reference_images["red"], rows=3)
    ready = stages.embed(ctx, item_ids=ids[:2]).ready
    assert ready == ids[:2]
    lost = [ids[0], ids[2]]  # one ready, one pending; ids[1] moved a moment ago
    with ctx.sessions.begin() as s:
        s.execute(
            sa.update(Item)
            .where(Item.id.in_(lost))
            .values(updated_at=utcnow() - timedelta(hours=1))
        )
    embeds: list[list[int]] = []
    generates: list[list[int]] = []
    queues = {"embed": 2, "generate": 5}  # messages still waiting: they may be these items'
    reap = functools.partial(
        stages.reap,
        ctx,
        enqueue_embed=embeds.append,
        enqueue_generate=generates.append,
        queue_depth=queues.__getitem__,
    )
    assert reap() == 0 and embeds == generates == []
    queues["embed"] = 0
    assert reap() == 1 and embeds == [[ids[2]]] and generates == []
    queues["generate"] = 0
    assert reap() == 1 and embeds == [[ids[2]]] and generates == [[ids[0]]]
    assert reap() == 0  # queued again just now: not again before another IPBATCH_REQUEUE_AFTER
    with ctx.sessions.begin() as s:
        requeued = s.scalars(
            sa.select(ItemEvent.item_id).where(ItemEvent.message.like("%queued again%"))
        ).all()
        statuses = [i.status for i in ledger.load_items(s, item_ids=ids)]
    assert sorted(requeued) == lost
    assert statuses == [ItemStatus.READY, ItemStatus.READY, ItemStatus.PENDING]
    ready += stages.embed(ctx, item_ids=[ids[2]]).ready
    assert stages.generate(ctx, item_ids=ready).succeeded == 3


def test_an_outage_does_not_count_as_a_delivery(
    ctx: StageContext,
    tmp_path: Path,
    reference_images: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3 down for more tries than IPBATCH_MAX_DELIVERIES (5): each try gives its claim back
    cleanly and is refunded, so the item succeeds once S3 is back instead of failing as
    `internal` (which is for items whose worker dies each time)."""
    [item_id] = stages.embed(
        ctx, item_ids=_job(ctx, tmp_path, reference_images["red"], rows=1)
    ).ready
    real_store = stages._store_images
    outage = iter(range(ctx.settings.max_deliveries + 2))

    def store(*args: Any) -> Any:
        if next(outage, None) is not None:
            raise RetryableError("S3 unreachable (test)")
        return real_store(*args)

    monkeypatch.setattr(stages, "_store_images", store)
    for _ in range(ctx.settings.max_deliveries + 2):
        with pytest.raises(RetryableError):
            stages.generate(ctx, item_ids=[item_id])
    assert stages.generate(ctx, item_ids=[item_id]).succeeded == 1
    with ctx.sessions.begin() as s:
        [item] = ledger.load_items(s, item_ids=[item_id])
        claims = s.scalar(
            sa.select(sa.func.count()).where(
                ItemEvent.item_id == item_id, ItemEvent.to_status == "running"
            )
        )
    assert (item.status, item.attempts, claims) == (ItemStatus.SUCCEEDED, 1, 8)
