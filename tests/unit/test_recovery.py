"""Nothing stranded, nobody stale writing: a job whose ingest message was never sent, a model
that does not load, a worker that lost its claim mid-batch, a cached embedding that vanished,
and what an operator is told. One machine (SQLite, a local folder), the real stages."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers.cli import ipbatch
from helpers.clock import ManualClock
from helpers.jobs import ingest_job, local_context, write_manifest
from kombu.exceptions import OperationalError as BrokerError

from core.errors import ModelLoadError
from storage.ledger import items
from storage.ledger import jobs as job_ledger
from storage.lifecycle import GENERATE
from storage.models import ItemEvent, Output
from workers import metrics
from workers.context import StageContext
from workers.stages import embed, generate, ingest, jobs


@pytest.fixture()
def ctx(tmp_path: Path, tiny_models: Path, clock: ManualClock) -> Iterator[StageContext]:
    context = local_context(tmp_path / "home", tiny_models, lease_seconds=5, clock=clock)
    yield context
    context.close()


def rows(reference: Path, n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "reference": str(reference), "steps": 1} for i in range(n)]


def history(
    ctx: StageContext, item_id: int
) -> list[tuple[str | None, str, str | None, str | None]]:
    with ctx.sessions.begin() as s:
        return [
            tuple(e)  # type: ignore[misc]
            for e in s.execute(
                sa.select(
                    ItemEvent.from_status, ItemEvent.to_status, ItemEvent.worker, ItemEvent.message
                )
                .where(ItemEvent.item_id == item_id)
                .order_by(ItemEvent.id)
            )
        ]


def state(ctx: StageContext, ids: list[int]) -> list[tuple[str, int]]:
    with ctx.sessions.begin() as s:
        return [(str(i.status), i.attempts) for i in items.load_items(s, item_ids=ids)]


# --- 1. a lost ingest message ---------------------------------------------------------------


def test_a_job_whose_ingest_was_never_sent_is_not_stranded(
    ctx: StageContext, tmp_path: Path, reference_images: dict[str, Path], clock: ManualClock
) -> None:
    """The publish fails after the job row committed (the broker was down at that moment):
    submitting the same manifest again sends the ingest (before, it returned the job and sent
    nothing: the job stayed pending for ever), and so does the reaper once the job has waited
    IPBATCH_REQUEUE_AFTER with the ingest queue empty."""
    manifest = write_manifest(tmp_path / "m.jsonl", rows(reference_images["red"], 2))
    submit = functools.partial(
        jobs.submit, ctx, manifest_uri=str(manifest), output_uri=str(tmp_path / "out")
    )

    def broker_down(job_id: str) -> None:
        raise BrokerError("[Errno 111] Connection refused")

    with pytest.raises(BrokerError):
        submit(send_ingest=broker_down)
    sent: list[str] = []
    job_id, created = submit(send_ingest=sent.append)
    assert not created and sent == [job_id]  # the resubmit sends it

    # and without a resubmit: the reaper, once the job has waited long enough
    other = write_manifest(tmp_path / "other.jsonl", rows(reference_images["blue"], 2, "o"))
    with pytest.raises(BrokerError):
        jobs.submit(
            ctx, manifest_uri=str(other), output_uri=str(tmp_path / "out"), send_ingest=broker_down
        )
    reap = functools.partial(
        jobs.reap,
        ctx,
        send=lambda stage, ids: None,
        send_job=lambda stage, job_id: sent.append(job_id),
        queue_depth=lambda q: 0,
    )
    assert reap().jobs == 0  # not waited long enough yet
    clock.advance(ctx.settings.requeue_after + 1)
    assert reap().jobs == 2 and len(sent) == 3  # both jobs still wait: both are sent again
    assert reap().jobs == 0  # once per IPBATCH_REQUEUE_AFTER
    # the ingests run (a duplicate finds the job taken or read) and the jobs finish
    for job in sent:
        ingest.run(ctx, job_id=job, send=lambda stage, ids: None)
    with ctx.sessions.begin() as s:
        statuses = {j: job_ledger.get(s, job_id=j).total_rows for j in sent}  # type: ignore[union-attr]
    assert set(statuses.values()) == {2}


# --- 4. a model that does not load ---------------------------------------------------------


def _models_with_copy(tmp_path: Path, tiny_models: Path, folder: str) -> Path:
    """The tiny models, with `folder` copied (the rest linked) so a test may damage it."""
    models = tmp_path / "models"
    models.mkdir()
    for entry in tiny_models.iterdir():
        if entry.name == folder:
            shutil.copytree(entry, models / folder)
        else:
            (models / entry.name).symlink_to(entry)
    return models


@pytest.mark.parametrize(
    ("folder", "file"),
    [
        ("IP-Adapter", "models/ip-adapter_sd15.safetensors"),
        ("clip-vit-large-patch14", "model.safetensors"),  # the scoring model
    ],
)
@pytest.mark.slow
def test_a_model_that_does_not_load_gives_its_items_back(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path], folder: str, file: str
) -> None:
    """A corrupt adapter or scoring model: the claimed items go back to waiting with their
    claims refunded and a message naming the file (before, they stayed `running` until their
    lease lapsed and finally failed as "worker died or hung"); `ipbatch run` stops with exit 2
    naming the file, and once the file is fixed the same command finishes the job."""
    models = _models_with_copy(tmp_path, tiny_models, folder)
    damaged = models / folder / file
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 3])  # truncated
    ctx = local_context(tmp_path / "home", models)
    manifest = write_manifest(tmp_path / "m.jsonl", rows(reference_images["red"], 3))
    _, pending = ingest_job(ctx, manifest=manifest, output=tmp_path / "home" / "outputs")
    ready = embed.run(ctx, item_ids=pending).ready
    with pytest.raises(ModelLoadError, match=str(damaged)):
        generate.run(ctx, item_ids=ready)
    assert state(ctx, ready) == [("ready", 0)] * 3
    from_, to, _, message = history(ctx, ready[0])[-1]
    assert (from_, to) == ("running", "ready")
    assert message is not None and str(damaged) in message and "configuration" in message
    ctx.close()

    env = {"IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(models)}
    stopped = ipbatch("run", "-q", str(manifest), env=env)
    assert stopped.returncode == 2 and str(damaged) in stopped.stderr, stopped.stderr
    damaged.write_bytes(good)
    finished = ipbatch("run", "-q", str(manifest), env=env)
    assert finished.returncode == 0 and "succeeded 3" in finished.stdout, finished.stderr


# --- 5. a worker that lost its claim --------------------------------------------------------


def test_a_worker_that_lost_its_claim_mid_batch_writes_nothing(
    tmp_path: Path,
    tiny_models: Path,
    reference_images: dict[str, Path],
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker A generates a batch, then pauses past its lease; worker B takes the items over.
    When A comes back it stores and records nothing (before, it marked B's items succeeded
    with its own outputs); B then finishes them, each image stored and recorded once."""
    a = local_context(tmp_path / "home", tiny_models, lease_seconds=5, clock=clock, worker="a")
    b = local_context(tmp_path / "home", tiny_models, lease_seconds=60, clock=clock, worker="b")
    manifest = write_manifest(tmp_path / "m.jsonl", rows(reference_images["red"], 3))
    job_id, pending = ingest_job(a, manifest=manifest, output=tmp_path / "out")
    ready = embed.run(a, item_ids=pending).ready
    real = generate._generate
    fenced = metrics.FENCED.labels(GENERATE.name)._value.get()

    def paused_after_generating(ctx_: StageContext, work: Any, batch: Any) -> Any:
        made = real(ctx_, work, batch)
        if ctx_ is a:
            clock.advance(6)  # A's lease lapses while it is paused; B takes the items over
            with b.sessions.begin() as s:
                taken = items.claim(
                    s, item_ids=ready, stage=GENERATE, worker="b", lease_seconds=60, now=clock()
                )
            assert taken.ids == ready
        return made

    monkeypatch.setattr(generate, "_generate", paused_after_generating)
    assert generate.run(a, item_ids=ready).succeeded == 0
    assert metrics.FENCED.labels(GENERATE.name)._value.get() - fenced == 3
    assert not (tmp_path / "out" / job_id).exists()  # A uploaded nothing
    with a.sessions.begin() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Output)) == 0
    assert state(a, ready) == [("running", 2)] * 3  # B's claims, attempts not miscounted

    clock.advance(61)  # B died too; its items are taken over once more and finished
    assert generate.run(b, item_ids=ready).succeeded == 3
    with b.sessions.begin() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Output)) == 3
    assert len(list((tmp_path / "out" / job_id).rglob("*.png"))) == 3
    assert [e[1:3] for e in history(a, ready[0]) if e[1] in ("running", "succeeded")] == [
        ("running", "a"),
        ("running", "b"),
        ("running", "b"),
        ("succeeded", "b"),
    ]
    a.close()
    b.close()


# --- 8. a cached embedding that vanished ---------------------------------------------------


@pytest.mark.slow
def test_a_cached_embedding_that_vanished_is_computed_again(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]
) -> None:
    """The `embeddings` row is there, its object is gone (a bucket lifecycle rule, a wiped
    store). Before: items failed as `internal`, and `ipbatch retry` failed them again. Now the
    embed stage writes it again, and an item that finds it gone at generation time goes back
    to the embed stage."""
    env = {"IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    first = write_manifest(tmp_path / "first.jsonl", rows(reference_images["red"], 2, "a"))
    assert ipbatch("run", "-q", str(first), env=env).returncode == 0
    cache = tmp_path / "home" / "cache"
    shutil.rmtree(cache)
    # a) a new job with the same reference: found in the ledger, gone from the store
    second = write_manifest(tmp_path / "second.jsonl", rows(reference_images["red"], 2, "b"))
    result = ipbatch("run", "-q", str(second), env=env)
    assert result.returncode == 0 and "succeeded 2" in result.stdout, result.stdout + result.stderr
    assert any(cache.rglob("*.safetensors"))
    # b) gone between embedding and generation: back to embed, then finished
    ctx = local_context(tmp_path / "home", tiny_models)
    third = write_manifest(tmp_path / "third.jsonl", rows(reference_images["red"], 2, "c"))
    _, pending = ingest_job(ctx, manifest=third, output=tmp_path / "home" / "outputs")
    ready = embed.run(ctx, item_ids=pending).ready
    shutil.rmtree(cache)
    summary = generate.run(ctx, item_ids=ready)
    assert (summary.succeeded, summary.embed_again) == (0, ready)
    assert state(ctx, ready) == [("pending", 0)] * 2
    assert history(ctx, ready[0])[-1][3] == "a cached embedding is gone: embed it again"
    ctx.close()
    result = ipbatch("run", "-q", str(third), env=env)
    assert result.returncode == 0 and "succeeded 2" in result.stdout, result.stdout + result.stderr


# --- 10. what operators are told -----------------------------------------------------------


def test_cancelling_a_finished_job_says_so_and_fails(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]
) -> None:
    env = {"IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    manifest = write_manifest(tmp_path / "m.jsonl", rows(reference_images["red"], 1))
    run = ipbatch("run", "-q", str(manifest), env=env)
    job_id = run.stdout.split()[1].rstrip(":")
    cancel = ipbatch("cancel", job_id, env=env)
    assert cancel.returncode == 1
    assert f"job {job_id} had already ended (succeeded): nothing cancelled" in cancel.stderr
    assert ipbatch("cancel", "no-such-job", env=env).returncode == 2
