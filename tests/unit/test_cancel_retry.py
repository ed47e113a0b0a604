"""`ipbatch cancel` and `ipbatch retry` on one machine: queued items stop at once, running
ones at the batch boundary; retry runs failed items again (not invalid rows) and redoes
nothing else."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.cli import ipbatch
from helpers.jobs import ingest_job, local_context


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


@pytest.mark.slow
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
    from workers.stages import embed, generate

    tmp, env = local_job
    ctx = local_context(tmp / "home", Path(env["IPBATCH_MODELS"]), batch_images=1)  # a row a batch
    job_id, pending = ingest_job(ctx, manifest=tmp / "m.jsonl", output=tmp / "out")
    ready = embed.run(ctx, item_ids=pending).ready
    real_generate = generate._generate
    calls: list[int] = []

    def cancel_during_first(ctx_, work, batch):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        if len(calls) == 1:  # `ipbatch cancel` from another terminal, mid-call
            assert ipbatch("cancel", job_id, env=env, cwd=tmp).returncode == 0
        return real_generate(ctx_, work, batch)

    monkeypatch.setattr(generate, "_generate", cancel_during_first)
    summary = generate.run(ctx, item_ids=ready)
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
    assert n_outputs == len(files) - 1 == 1  # and its results.jsonl, written once it settled
    assert (tmp / "out" / job_id / "results.jsonl").is_file()


def test_retry_also_queues_items_left_waiting(local_job: tuple[Path, dict[str, str]]) -> None:
    """Items released back to waiting with no message left for them (a worker hit a
    configuration error) are queued again by `ipbatch retry`, with the failed ones."""
    from workers.stages import embed, jobs

    tmp, env = local_job
    ctx = local_context(tmp / "home", Path(env["IPBATCH_MODELS"]))
    job_id, pending = ingest_job(ctx, manifest=tmp / "m.jsonl", output=tmp / "out")
    ready = embed.run(ctx, item_ids=pending).ready  # `late` fails: its file is missing
    sent: dict[str, list[int]] = {"embed": [], "generate": []}
    retried, waiting = jobs.retry(
        ctx, job_id=job_id, send=lambda stage, ids: sent[stage.name].extend(ids)
    )
    ctx.close()
    assert (retried, waiting) == (1, 4)
    assert sent["embed"] == [pending[4]] and sorted(sent["generate"]) == sorted(ready)


def test_a_cancelled_job_is_run_again_as_a_new_job(local_job: tuple[Path, dict[str, str]]) -> None:
    """`ipbatch rerun`: a new job of the same manifest and output (run 2, linked to the first,
    its own id, name and outputs); `retry` of a cancelled job points to it; `run` of the same
    manifest then resumes the newest run."""
    tmp, env = local_job
    ctx = local_context(tmp / "home", Path(env["IPBATCH_MODELS"]))
    job_id, _ = ingest_job(ctx, manifest=tmp / "m.jsonl", output=tmp / "out")
    ctx.close()
    assert ipbatch("cancel", job_id, env=env, cwd=tmp).returncode == 0
    refused = ipbatch("retry", job_id, env=env, cwd=tmp)
    assert refused.returncode == 2 and f"`ipbatch rerun {job_id}`" in refused.stderr

    again = ipbatch("rerun", "-q", job_id, "--name", "second night", env=env, cwd=tmp)
    assert again.returncode == 1, again.stderr  # `late` (no file) and `bad` fail again
    new_id = again.stdout.split()[1].rstrip(":")
    engine = _db(tmp)
    with engine.connect() as conn:
        jobs = conn.execute(
            sa.text("SELECT id, run, rerun_of, name, status FROM jobs ORDER BY run")
        ).all()
    engine.dispose()
    assert jobs == [
        (job_id, 1, None, "m.jsonl", "cancelled"),
        (new_id, 2, job_id, "second night", "partial"),
    ]
    assert len(list((tmp / "out" / new_id).rglob("*.png"))) == 4
    assert not list((tmp / "out" / job_id).rglob("*.png"))  # the cancelled run made none
    resumed = ipbatch("run", "-q", "m.jsonl", "--output", "out", env=env, cwd=tmp)
    assert f"job {new_id}: partial" in resumed.stdout and "images this run: 0" in resumed.stdout
