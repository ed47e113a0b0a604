"""Claims are leases: the heartbeat renews a live worker's, the reaper takes back a dead
worker's and sends its items again. Time is a ManualClock: leases run out when the test says
so, never by racing the wall clock."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers.clock import ManualClock
from helpers.jobs import ingest_job, local_context, write_manifest

from core.errors import RetryableError
from storage.ledger import items
from storage.ledger import jobs as job_ledger
from storage.lifecycle import EMBED, GENERATE, Stage
from storage.models import Item, ItemEvent, ItemStatus, Output
from workers.context import StageContext
from workers.stages import embed, generate, jobs

LEASE = 5


@pytest.fixture()
def ctx(tmp_path: Path, tiny_models: Path, clock: ManualClock) -> Iterator[StageContext]:
    context = local_context(tmp_path / "home", tiny_models, lease_seconds=LEASE, clock=clock)
    yield context
    context.close()


def _job(ctx: StageContext, tmp_path: Path, reference: Path, rows: int) -> list[int]:
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [{"id": f"r{i}", "reference": str(reference), "steps": 1} for i in range(rows)],
    )
    return ingest_job(ctx, manifest=manifest, output=tmp_path / "o")[1]


class Sent:
    """What a stage sent on, by stage name."""

    def __init__(self) -> None:
        self.items: dict[str, list[list[int]]] = {"embed": [], "generate": []}
        self.jobs: list[str] = []

    def __call__(self, stage: Stage, item_ids: list[int]) -> None:
        self.items[stage.name].append(item_ids)


def test_expired_lease_is_reclaimed_only_once_it_has_run_out(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path], clock: ManualClock
) -> None:
    """A claim holds until its lease runs out on the ledger's clock, then another worker may
    take the items over; the old holder's token no longer writes anything."""
    ids = _job(ctx, tmp_path, reference_images["red"], rows=2)
    claim = functools.partial(items.claim, item_ids=ids, stage=EMBED, lease_seconds=LEASE)
    with ctx.sessions.begin() as s:
        first = claim(s, worker="a", now=clock())
    clock.advance(LEASE - 0.001)
    with ctx.sessions.begin() as s:
        assert claim(s, worker="b", now=clock()).ids == []  # still a's
    clock.advance(0.002)
    with ctx.sessions.begin() as s:
        second = claim(s, worker="b", now=clock())
    assert first.ids == second.ids == ids and first.token != second.token
    with ctx.sessions.begin() as s:
        late = items.transition(
            s,
            item_ids=ids,
            from_status=EMBED.working,
            to_status=EMBED.next,
            now=clock(),
            worker="a",
            token=first.token,
        )
        attempts = [i.attempts for i in items.load_items(s, item_ids=ids)]
    assert late == [] and attempts == [2, 2]


def test_reaper_requeues_only_what_dead_workers_held(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path], clock: ManualClock
) -> None:
    ids = _job(ctx, tmp_path, reference_images["red"], rows=5)
    assert embed.run(ctx, item_ids=ids[:2]).ready == ids[:2]
    with ctx.sessions.begin() as s:
        # r0, r1: generating; r2: embedding; r3: embedding under a long lease; r4: pending
        for item_ids, stage, lease in (
            (ids[:2], GENERATE, 1),
            (ids[2:3], EMBED, 1),
            (ids[3:4], EMBED, 60),
        ):
            items.claim(
                s, item_ids=item_ids, stage=stage, worker="w", lease_seconds=lease, now=clock()
            )
    clock.advance(2)
    sent = Sent()
    reaped = jobs.reap(ctx, send=sent, send_job=lambda stage, job_id: sent.jobs.append(job_id))
    assert (reaped.items, reaped.jobs) == (3, 0)
    assert sent.items == {"embed": [ids[2:3]], "generate": [ids[:2]]}
    with ctx.sessions.begin() as s:
        statuses = [i.status for i in items.load_items(s, item_ids=ids)]
        reaped_events = s.scalar(
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
    assert reaped_events == 3
    assert (
        jobs.reap(ctx, send=sent, send_job=lambda stage, job_id: sent.jobs.append(job_id)).items
        == 0
    )
    # the requeued items run to the end like any other
    ready = embed.run(ctx, item_ids=ids[2:3] + ids[4:]).ready
    assert generate.run(ctx, item_ids=ids[:2] + ready).succeeded == 4


def test_heartbeat_keeps_a_long_batch_claimed(
    ctx: StageContext,
    tmp_path: Path,
    reference_images: dict[str, Path],
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch that runs longer than its lease keeps its items: while it runs, the clock moves
    past the lease three times, and each time the heartbeat renews it before a thief tries."""
    ids = _job(ctx, tmp_path, reference_images["red"], rows=2)
    ready = embed.run(ctx, item_ids=ids).ready
    real_generate = generate._generate
    stolen: list[list[int]] = []

    def lease_left() -> float:
        with ctx.sessions.begin() as s:
            until = s.scalar(sa.select(sa.func.min(Item.lease_until)).where(Item.id.in_(ready)))
        assert until is not None
        return (until - clock()).total_seconds()

    def slow(*args: Any) -> Any:
        for _ in range(3):
            clock.advance(LEASE - 1)  # 1 s left of the lease
            deadline = time.monotonic() + 60
            while lease_left() < LEASE - 0.5 and time.monotonic() < deadline:
                time.sleep(0.1)  # until the heartbeat (every LEASE / 3 s) has renewed it
            with ctx.sessions.begin() as s:
                thief = items.claim(
                    s, item_ids=ready, stage=GENERATE, worker="thief", lease_seconds=60, now=clock()
                )
            stolen.append(thief.ids)
        return real_generate(*args)

    monkeypatch.setattr(generate, "_generate", slow)
    assert generate.run(ctx, item_ids=ready).succeeded == 2
    assert stolen == [[], [], []]


def test_an_image_stored_by_an_earlier_attempt_is_kept_and_recorded(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path]
) -> None:
    """A worker died after uploading its items' images but before recording them. The next
    attempt makes the same bytes (the same rows in the same call), finds them at the keys and
    keeps them: no second write, the checksums of what is stored recorded. (Other bytes at a
    key are replaced or refused: tests/integration/test_s3_failures.py.)"""
    ids = _job(ctx, tmp_path, reference_images["red"], rows=2)
    ready = embed.run(ctx, item_ids=ids).ready
    assert generate.run(ctx, item_ids=ready).succeeded == 2
    with ctx.sessions.begin() as s:
        stored = dict(s.execute(sa.select(Output.uri, Output.sha256)).all())
        job_id = items.load_items(s, item_ids=ready[:1])[0].job_id
        # what the worker killed between upload and commit leaves: images, no record
        job_ledger.regenerate(s, job_id=job_id, item_ids=ready, now=ctx.clock(), reason="test")
        assert s.scalar(sa.select(sa.func.count()).select_from(Output)) == 0
    written = {uri: Path(uri).stat().st_mtime_ns for uri in stored}
    assert generate.run(ctx, item_ids=ready).succeeded == 2
    with ctx.sessions.begin() as s:
        assert dict(s.execute(sa.select(Output.uri, Output.sha256)).all()) == stored
    assert {uri: Path(uri).stat().st_mtime_ns for uri in stored} == written  # kept, not rewritten
    for uri, sha in stored.items():
        assert hashlib.sha256(Path(uri).read_bytes()).hexdigest() == sha


def test_reaper_queues_again_items_whose_message_was_lost(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path], clock: ManualClock
) -> None:
    """Items waiting for a stage, unmoved for IPBATCH_REQUEUE_AFTER, are sent again once that
    stage's queue is empty (their message is gone), and only then."""
    ids = _job(ctx, tmp_path, reference_images["red"], rows=3)
    clock.advance(ctx.settings.requeue_after + 1)
    ready = embed.run(ctx, item_ids=ids[1:2]).ready  # moves now: not stale
    assert ready == ids[1:2]
    sent = Sent()
    queues = {
        "ingest": 0,
        "embed": 2,
        "generate": 5,
        "train": 0,
    }  # messages waiting: maybe these items'
    reap = functools.partial(
        jobs.reap,
        ctx,
        send=sent,
        send_job=lambda stage, job_id: sent.jobs.append(job_id),
        queue_depth=queues.__getitem__,
    )
    assert reap().items == 0 and sent.items == {"embed": [], "generate": []}
    queues["embed"] = 0
    assert reap().items == 2 and sent.items == {"embed": [[ids[0], ids[2]]], "generate": []}
    queues["generate"] = 0
    assert reap().items == 0  # ids[1] became ready a moment ago
    clock.advance(ctx.settings.requeue_after + 1)
    assert reap().items == 3  # two sent again a requeue period ago, and the ready one
    assert sent.items == {"embed": [[ids[0], ids[2]]] * 2, "generate": [ids[1:2]]}
    assert reap().items == 0  # not again before another IPBATCH_REQUEUE_AFTER
    assert sent.jobs == []  # the job's ingest is done
    with ctx.sessions.begin() as s:
        requeued = s.scalars(
            sa.select(ItemEvent.item_id).where(ItemEvent.message.like("%queued again%"))
        ).all()
    assert sorted(requeued) == sorted([ids[0], ids[2]] * 2 + [ids[1]])
    ready += embed.run(ctx, item_ids=[ids[0], ids[2]]).ready
    assert generate.run(ctx, item_ids=ready).succeeded == 3


def test_an_outage_does_not_count_as_a_delivery(
    ctx: StageContext,
    tmp_path: Path,
    reference_images: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3 down for more tries than IPBATCH_MAX_DELIVERIES (5): each try gives its claim back
    cleanly and is refunded, so the item succeeds once S3 is back instead of failing as
    `internal` (which is for items whose worker dies each time)."""
    [item_id] = embed.run(ctx, item_ids=_job(ctx, tmp_path, reference_images["red"], rows=1)).ready
    real_upload = generate._upload
    outage = iter(range(ctx.settings.max_deliveries + 2))

    def upload(*args: Any, **kwargs: Any) -> Any:
        if next(outage, None) is not None:
            raise RetryableError("S3 unreachable (test)", dependency="s3")
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(generate, "_upload", upload)
    for _ in range(ctx.settings.max_deliveries + 2):
        with pytest.raises(RetryableError):
            generate.run(ctx, item_ids=[item_id])
    assert generate.run(ctx, item_ids=[item_id]).succeeded == 1
    with ctx.sessions.begin() as s:
        [item] = items.load_items(s, item_ids=[item_id])
        claims = s.scalar(
            sa.select(sa.func.count()).where(
                ItemEvent.item_id == item_id, ItemEvent.to_status == "running"
            )
        )
    assert (item.status, item.attempts, claims) == (ItemStatus.SUCCEEDED, 1, 8)


def test_the_reaper_sends_each_job_stage_its_own_dead_claims(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path], clock: ManualClock
) -> None:
    """Job stages are in the stage table: a training run whose worker died is sent again to
    the `train` stage and its event says so (it used to say "ingest lease expired")."""
    from storage.ledger import job_claims, training
    from storage.lifecycle import INGEST, TRAIN, JobStage
    from storage.models import JobEvent

    with ctx.sessions.begin() as s:
        job_id, _ = training.register(
            s,
            name="shop",
            manifest_uri=str(tmp_path / "train.jsonl"),
            manifest_sha256="0" * 64,
            output_uri=str(tmp_path / "adapters" / "shop"),
            settings={},
            total_steps=10,
            now=clock(),
        )
        assert (
            job_claims.claim(
                s, job_id=job_id, stage=INGEST, worker="w", lease_seconds=LEASE, now=clock()
            )
            is None
        )  # a training job is no ingest's
        assert job_claims.claim(
            s, job_id=job_id, stage=TRAIN, worker="w", lease_seconds=LEASE, now=clock()
        )
    clock.advance(LEASE + 1)  # the training worker died
    sent: list[tuple[JobStage, str]] = []
    reaped = jobs.reap(ctx, send=Sent(), send_job=lambda stage, job: sent.append((stage, job)))
    assert reaped.jobs == 1 and sent == [(TRAIN, job_id)]
    with ctx.sessions.begin() as s:
        messages = s.scalars(sa.select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    assert "training lease expired: train queued again by the reaper" in messages
    assert not any(m.startswith("ingest") for m in messages)
