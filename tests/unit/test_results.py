"""When a job ends: `{output}/{job}/results.jsonl` (one line per row, as the ledger has it)
and the webhook, POSTed to a real HTTP server here, retried with backoff (time moved by hand)
until it answers; the URL's token never reaches a log."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.cli import ipbatch
from helpers.clock import ManualClock
from helpers.jobs import local_context
from helpers.webhook import Hook

from workers.stages import results


@pytest.fixture()
def hook() -> Iterator[Hook]:
    server = Hook([500])  # the first call fails
    yield server
    server.close()


def test_an_ended_job_writes_its_results_and_calls_its_webhook(
    tmp_path: Path,
    tiny_models: Path,
    reference_images: dict[str, Path],
    hook: Hook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = [
        {"id": "ok", "reference": str(reference_images["red"]), "steps": 1, "num_images": 2},
        {"id": "gone", "reference": str(tmp_path / "nope.png"), "steps": 1},
        {"id": "bad", "reference": "x.png", "steps": 0},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    run = ipbatch("run", "-q", "m.jsonl", "--webhook", hook.url, env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stderr  # partial
    job_id = run.stdout.split()[1].rstrip(":")
    assert "s3cret" not in run.stdout + run.stderr

    # results.jsonl next to the images: every row, as the ledger has it
    lines = (tmp_path / "home" / "outputs" / job_id / "results.jsonl").read_text().splitlines()
    found = {row["id"]: row for row in map(json.loads, lines)}
    assert list(found) == ["ok", "gone", "bad"]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'ipbatch.db'}")
    with engine.connect() as conn:
        outputs = conn.execute(
            sa.text(
                "SELECT uri, seed, clip_i, clip_t, gpu_seconds FROM outputs ORDER BY image_index"
            )
        ).all()
        results_uri, retry_at = conn.execute(
            sa.text("SELECT results_uri, webhook_after FROM jobs")
        ).one()
    engine.dispose()
    assert found["ok"] == {
        "id": "ok",
        "status": "succeeded",
        "error_code": None,
        "message": None,
        "outputs": [uri for uri, *_ in outputs],
        "scores": [{"clip_i": ci, "clip_t": ct} for _, _, ci, ct, _ in outputs],
        "seed": outputs[0][1],
        "gpu_seconds": round(sum(seconds for *_, seconds in outputs), 3),
        "reused": False,
    }
    assert (found["gone"]["status"], found["gone"]["error_code"]) == (
        "failed",
        "reference_not_found",
    )
    assert found["bad"]["error_code"] == "invalid_row" and "steps" in found["bad"]["message"]
    assert results_uri.endswith(f"/{job_id}/results.jsonl")

    # the webhook was called once and failed (500); later passes back off, then it answers
    [(path, summary)] = hook.received
    assert path == "/hooks/ipbatch?token=s3cret"
    assert (summary["job_id"], summary["status"], summary["total"]) == (job_id, "partial", 3)
    assert (summary["succeeded"], summary["failed"], summary["results"]) == (1, 2, results_uri)
    # the next try is due 30 s after the failed one: just before, then just after
    clock = ManualClock(datetime.fromisoformat(retry_at).replace(tzinfo=UTC) - timedelta(seconds=1))
    ctx = local_context(tmp_path / "home", tiny_models, clock=clock)
    with caplog.at_level(logging.INFO):
        results.catch_up(ctx)
        assert len(hook.received) == 1
        clock.advance(2)
        results.catch_up(ctx)
        assert len(hook.received) == 2
        clock.advance(3600)
        results.catch_up(ctx)  # answered: never again
    ctx.close()
    assert len(hook.received) == 2 and hook.received[1][1] == summary
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'ipbatch.db'}")
    with engine.connect() as conn:
        attempts, notified = conn.execute(
            sa.text("SELECT webhook_attempts, notified_at FROM jobs")
        ).one()
    engine.dispose()
    assert attempts == 2 and notified is not None
    assert "webhook http://127.0.0.1/... told" in caplog.text and "s3cret" not in caplog.text


def test_a_webhook_must_be_http() -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="http:// or https://"):
        results.check_webhook_url("ftp://example.com/hook")
    assert results.check_webhook_url("https://example.com/h?t=1") == "https://example.com/h?t=1"
