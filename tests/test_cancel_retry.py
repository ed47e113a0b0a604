"""`ipbatch cancel` and `ipbatch retry`: queued items stop at once, running ones at the batch
boundary; retry runs failed items again (not invalid rows) and redoes nothing else."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import ingested_job, ipbatch
from sqlalchemy.orm import Session, sessionmaker

from storage import ledger
from storage.models import ItemStatus, JobStatus


def test_cancel_stops_what_has_not_started(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        job_id, _ = ledger.create_job(
            s, name="j", manifest_uri="m", manifest_sha256="e" * 64, output_uri="/o"
        )
        ledger.start_job(s, job_id=job_id)
        rows = [
            {"row_id": f"r{i}", "row_index": i, "status": ItemStatus.PENDING, "params": {}}
            for i in range(6)
        ]
        ids = ledger.add_items(s, job_id=job_id, rows=rows)
        claim = {"worker": "w", "lease_seconds": 60}
        ledger.claim(
            s, item_ids=ids[:4], waiting=ItemStatus.PENDING, working=ItemStatus.EMBEDDING, **claim
        )
        ledger.transition(
            s, item_ids=ids[:3], from_status=ItemStatus.EMBEDDING, to_status=ItemStatus.READY
        )
        ledger.claim(
            s, item_ids=ids[:2], waiting=ItemStatus.READY, working=ItemStatus.RUNNING, **claim
        )
        ledger.complete_item(s, item_id=ids[0], outputs=[], worker="w")
    # now: succeeded 1, running 1, ready 1, embedding 1, pending 2
    with sessions.begin() as s:
        assert ledger.cancel_job(s, job_id=job_id, worker="me") == 4
    with sessions.begin() as s:
        statuses = [i.status for i in ledger.load_items(s, item_ids=ids)]
        job = ledger.get_job(s, job_id=job_id)
        assert job is not None and job.status == JobStatus.CANCELLED and job.finished_at
        assert ledger.cancel_job(s, job_id=job_id) == 0  # once is enough
    assert statuses == [ItemStatus.SUCCEEDED, ItemStatus.RUNNING] + [ItemStatus.CANCELLED] * 4
    with sessions.begin() as s:  # the running one finishes its batch; the job stays cancelled
        assert ledger.complete_item(s, item_id=ids[1], outputs=[], worker="w")
        assert ledger.finalize_job(s, job_id=job_id) is None
        assert ledger.get_job(s, job_id=job_id).status == JobStatus.CANCELLED  # type: ignore[union-attr]


@pytest.fixture()
def local_job(
    tmp_path: Path, reference_images: dict[str, Path], tiny_models: Path
) -> tuple[Path, dict[str, str]]:
    assert reference_images["red"] == tmp_path / "refs" / "red.png"
    rows = [
        {"id": f"ok-{i}", "prompt": f"shoe {i}", "reference": "refs/red.png", "steps": 1}
        for i in range(4)
    ]
    rows += [
        {"id": "late", "reference": "refs/late.png", "steps": 1, "num_images": 2},
        {"id": "bad", "reference": "refs/red.png", "steps": 0},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    return tmp_path, env


def _db(tmp: Path) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{tmp / 'home' / 'ipbatch.db'}")


def test_retry_runs_failed_items_again_and_nothing_else(
    local_job: tuple[Path, dict[str, str]], reference_images: dict[str, Path]
) -> None:
    tmp, env = local_job
    first = ipbatch("run", "-q", "m.jsonl", env=env, cwd=tmp)
    assert first.returncode == 1, first.stderr
    job_id = first.stdout.split()[1].rstrip(":")
    engine = _db(tmp)
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT item_id, uri, created_at FROM outputs")).all()
    shutil.copy(reference_images["blue"], tmp / "refs" / "late.png")  # the user fixes it

    again = ipbatch("retry", "-q", job_id, env=env, cwd=tmp)
    assert again.returncode == 1, again.stderr  # `bad` is an invalid row: it stays failed
    assert "failed bad: invalid_row" in again.stdout and "images this run: 2" in again.stdout
    with engine.connect() as conn:
        items = dict(conn.execute(sa.text("SELECT row_id, status FROM items")).all())
        after = conn.execute(sa.text("SELECT item_id, uri, created_at FROM outputs")).all()
        history = conn.execute(
            sa.text(
                "SELECT e.from_status, e.to_status FROM item_events e JOIN items i "
                "ON i.id = e.item_id WHERE i.row_id = 'late' ORDER BY e.id"
            )
        ).all()
        attempts = conn.execute(sa.text("SELECT attempts FROM items WHERE row_id = 'late'")).one()
    engine.dispose()
    assert items == {
        **{f"ok-{i}": "succeeded" for i in range(4)},
        "late": "succeeded",
        "bad": "failed",
    }
    assert set(before) < set(after) and len(after) == len(before) + 2  # nothing redone
    assert ("failed", "pending") in history and history[-1] == ("running", "succeeded")
    assert attempts == (1,)  # claims of its current stage: one generate claim
    assert ipbatch("retry", "no-such-job", env=env, cwd=tmp).returncode == 2


def test_cancel_between_batches_stops_the_rest(
    local_job: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that arrives while a generate call runs: that batch finishes and is recorded,
    the call's later batches are cancelled, not generated, and nothing is written for them."""
    from workers import stages

    tmp, env = local_job
    ctx, job_id, pending = ingested_job(
        monkeypatch, env, manifest=tmp / "m.jsonl", output=tmp / "out", batch_images=1
    )  # one row per batch
    ready = stages.embed(ctx, item_ids=pending).ready
    real_run_batch = stages._run_batch
    calls: list[int] = []

    def cancel_during_first(ctx_, batch):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        if len(calls) == 1:  # `ipbatch cancel` from another terminal, mid-call
            assert ipbatch("cancel", job_id, env=env, cwd=tmp).returncode == 0
        return real_run_batch(ctx_, batch)

    monkeypatch.setattr(stages, "_run_batch", cancel_during_first)
    summary = stages.generate(ctx, item_ids=ready)
    ctx.close()
    assert calls == [1] and summary.succeeded == 1
    engine = _db(tmp)
    with engine.connect() as conn:
        counts = dict(
            conn.execute(sa.text("SELECT status, COUNT(*) FROM items GROUP BY status")).all()
        )
        n_outputs = conn.execute(sa.text("SELECT COUNT(*) FROM outputs")).scalar()
        job = conn.execute(sa.text("SELECT status, cancelled FROM job_progress")).one()
    engine.dispose()
    assert counts == {"succeeded": 1, "cancelled": 3, "failed": 2}  # late (no file), bad
    assert job == ("cancelled", 3)
    files = [p for p in (tmp / "out" / job_id).rglob("*") if p.is_file()]
    assert n_outputs == len(files) == 1


def test_retry_also_queues_items_left_waiting(
    local_job: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items released back to waiting with no message left for them (a worker hit a
    configuration error) are queued again by `ipbatch retry`, with the failed ones."""
    from workers import stages

    tmp, env = local_job
    ctx, job_id, pending = ingested_job(
        monkeypatch, env, manifest=tmp / "m.jsonl", output=tmp / "out"
    )
    ready = stages.embed(ctx, item_ids=pending).ready  # `late` fails: its file is missing
    embeds: list[int] = []
    generates: list[int] = []
    retried, waiting = stages.retry_job(
        ctx, job_id=job_id, enqueue_embed=embeds.extend, enqueue_generate=generates.extend
    )
    ctx.close()
    assert (retried, waiting) == (1, 4)
    assert embeds == [pending[4]] and sorted(generates) == sorted(ready)
