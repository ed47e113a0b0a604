"""The command line: usage errors, the schema, settings, and secrets kept out of output."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.cli import ipbatch

from core.config import Settings


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert ipbatch().returncode == 2
    assert ipbatch("worker", "--queues", "nope").returncode == 2
    missing = ipbatch(
        "run", str(tmp_path / "missing.jsonl"), env={"IPBATCH_HOME": str(tmp_path / "h")}
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad = ipbatch(
        "db", "upgrade", env={"IPBATCH_GENERATE_BATCH": "lots", "IPBATCH_HOME": str(tmp_path / "h")}
    )
    assert bad.returncode == 2 and "IPBATCH_" in bad.stderr


def test_manifest_schema_command() -> None:
    result = ipbatch("manifest", "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["num_images"]["maximum"] == 16


def test_allowed_sources_from_a_comma_list(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IPBATCH_ALLOWED_SOURCES", "s3://a/in/, /data/refs")
    assert Settings().allowed_sources == ["s3://a/in/", "/data/refs"]


def test_status_json_after_a_local_run(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]
) -> None:
    rows = [
        {"id": "ok", "reference": str(reference_images["red"]), "steps": 1},
        {"id": "gone", "reference": str(tmp_path / "nope.png"), "steps": 1},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    run = ipbatch("run", "-q", "m.jsonl", env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "failed gone: reference_not_found" in run.stdout
    job_id = run.stdout.split()[1].rstrip(":")
    status = json.loads(ipbatch("status", job_id, "--json", env=env).stdout)
    [job] = status["jobs"]
    assert (job["job_id"], job["total"], job["succeeded"], job["failed"]) == (job_id, 2, 1, 1)
    assert status["failures"] == [{"error_code": "reference_not_found", "n": 1}]
    assert job["failures"] == {"reference_not_found": 1}
    assert job["stages"] == {
        "pending": 0,
        "embedding": 0,
        "ready": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert job["elapsed_seconds"] > 0 and job["items_per_second"] > 0
    assert job["eta_seconds"] is None  # finished
    table = ipbatch("status", env=env)
    assert table.returncode == 0 and job_id in table.stdout
    assert "1 x reference_not_found" in table.stdout
    watched = ipbatch("status", job_id, "--watch", "--interval", "0.1", env=env)
    assert watched.returncode == 1  # over (one drawing), partial: `run`'s exit code
    assert f"job {job_id}" in watched.stdout and "succeeded  ####" in watched.stdout
    assert ipbatch("status", "--watch", env=env).returncode == 2
    assert ipbatch("status", "no-such-job", env=env).returncode == 2
    # a hand-made UPDATE leaves job_progress behind until `ipbatch db recount`
    import sqlite3

    with sqlite3.connect(tmp_path / "home" / "ipbatch.db") as db:
        db.execute("UPDATE items SET status = 'cancelled' WHERE status = 'failed'")
    stale = json.loads(ipbatch("status", job_id, "--json", env=env).stdout)["jobs"][0]
    assert (stale["failed"], stale["cancelled"]) == (1, 0)
    recount = ipbatch("db", "recount", env=env)
    assert recount.returncode == 0 and f"{job_id}: cancelled 1, succeeded 1" in recount.stdout
    fresh = json.loads(ipbatch("status", job_id, "--json", env=env).stdout)["jobs"][0]
    assert (fresh["failed"], fresh["cancelled"], fresh["total"]) == (0, 1, 2)
    assert ipbatch("db", "recount", "no-such-job", env=env).returncode == 2


def test_job_outcomes_have_exit_codes_and_max_failures_stops_a_job(
    tmp_path: Path, tiny_models: Path, reference_images: dict[str, Path]
) -> None:
    """No row succeeded: failed, exit 4 (from `run` and `status --watch`); past
    --max-failures the job stops at once: failed with the reason, the good rows cancelled."""
    env = {"IPBATCH_HOME": str(tmp_path / "home"), "IPBATCH_MODELS": str(tiny_models)}
    bad = [{"id": f"bad-{i}", "reference": "x.png", "steps": 0} for i in range(3)]
    good = [{"id": f"ok-{i}", "reference": str(reference_images["red"])} for i in range(3)]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    run = ipbatch("run", "-q", "bad.jsonl", env=env, cwd=tmp_path)
    assert run.returncode == 4 and "job " in run.stdout and ": failed" in run.stdout, run.stderr
    job_id = run.stdout.split()[1].rstrip(":")
    assert ipbatch("status", job_id, "--watch", env=env).returncode == 4

    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad + good))
    stopped = ipbatch("run", "-q", "mixed.jsonl", "--max-failures", "1", env=env, cwd=tmp_path)
    assert stopped.returncode == 4, stopped.stdout + stopped.stderr
    reason = "stopped early: 3 rows failed, more than --max-failures 1"
    assert reason in stopped.stdout and "cancelled 3" in stopped.stdout
    assert "images this run: 0" in stopped.stdout
    stopped_id = stopped.stdout.split()[1].rstrip(":")
    assert reason in ipbatch("status", stopped_id, env=env).stdout
    refused = ipbatch("run", "mixed.jsonl", "--max-failures", "1.5", env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "a number of rows" in refused.stderr


def test_messages_that_say_what_to_fix(tmp_path: Path) -> None:
    """One line each, naming the file or the setting, never a trace."""
    import subprocess
    import sys

    from helpers.cli import free_port

    env = {"IPBATCH_HOME": str(tmp_path / "home")}
    # a CSV under a .jsonl name: one error for the file, not one per line
    (tmp_path / "m.jsonl").write_text("id,reference\na,x.png\nb,y.png\n")
    run = ipbatch("run", "-q", "m.jsonl", env=env, cwd=tmp_path)
    assert run.returncode == 4, run.stdout + run.stderr
    assert (
        "not a JSON Lines file (one JSON object per line): line 1: not valid JSON" in run.stdout
        and "a CSV manifest needs a .csv name" in run.stdout
        and "items:  (of 0)" in run.stdout
    )
    # a database that does not answer is named by its setting (exit 3: try again later)
    down = {**env, "IPBATCH_DATABASE_URL": f"postgresql+psycopg://x@127.0.0.1:{free_port()}/x"}
    status = ipbatch("status", env=down)
    assert status.returncode == 3 and "database unreachable (IPBATCH_DATABASE_URL)" in status.stderr
    assert "Traceback" not in status.stderr
    # distributed submit with a path on this machine
    local = ipbatch("submit", "s3://b/m.jsonl", "--output", str(tmp_path / "out"), env=down)
    assert local.returncode == 2 and "is a path on this machine" in local.stderr
    # `| head` stops reading: no error
    piped = subprocess.run(
        f"'{sys.executable}' -m ipbatch.cli manifest schema | head -c 20",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stdout.startswith("{") and piped.stderr == "", piped.stderr
    # README's download command is one the installed huggingface_hub has
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "huggingface-cli" not in readme.replace("`huggingface-cli` is gone", "")
    hf = Path(sys.executable).parent / "hf"
    assert subprocess.run([str(hf), "download", "--help"], capture_output=True).returncode == 0


def test_manifest_check_finds_what_a_job_would_and_registers_nothing(
    tmp_path: Path, reference_images: dict[str, Path]
) -> None:
    env = {"IPBATCH_HOME": str(tmp_path / "home")}
    red = str(reference_images["red"])
    rows = [
        {"id": "ok", "reference": red},
        {"id": "bad", "reference": red, "steps": 0},
        {"id": "gone", "reference": "refs/nope.png"},
        {"id": "pose", "reference": red, "control": [{"model": "sd15-canny", "image": "c.png"}]},
        {"id": "negatives", "reference": red, "negative_reference": "n.png"},  # read
        {"id": "noise", "reference": red, "negative_reference": "noise"},  # made, not read
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = ipbatch("manifest", "check", "m.jsonl", "--output", "out", env=env, cwd=tmp_path)
    assert found.returncode == 1, found.stderr
    assert "6 rows: 5 valid, 1 invalid" in found.stdout
    assert "line 2: steps: Input should be greater than or equal to 1" in found.stdout
    assert "4 distinct pictures: 3 unusable" in found.stdout
    assert f"{tmp_path / 'refs' / 'nope.png'}" not in found.stdout  # named as written...
    assert "refs/nope.png: does not exist (line 3)" in found.stdout  # ...with its line
    assert "c.png: does not exist (line 4)" in found.stdout
    assert "n.png: does not exist (line 5)" in found.stdout
    assert "output out: writable" in found.stdout and "not ok" in found.stdout
    (tmp_path / "good.jsonl").write_text(json.dumps(rows[0]) + "\n")
    clean = ipbatch("submit", "good.jsonl", "--output", "out", "--dry-run", env=env, cwd=tmp_path)
    assert clean.returncode == 0 and "ok: a job of this manifest would start clean" in clean.stdout
    (tmp_path / "notes.jsonl").write_text("hello\nworld\n")
    refused = ipbatch("manifest", "check", "notes.jsonl", env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "not a JSON Lines file" in refused.stderr
    ledger = tmp_path / "home" / "ipbatch.db"  # nothing registered
    if ledger.exists():
        import sqlite3

        with sqlite3.connect(ledger) as db:
            tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master")}
            assert "jobs" not in tables or db.execute("SELECT COUNT(*) FROM jobs").fetchone() == (
                0,
            )


def test_models_tiny_says_insightfaces_licence(monkeypatch, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """It writes a face pack (a toy), where real packs go: it says whose licence those are."""
    import argparse

    import pipeline.tiny
    from ipbatch.cli.admin import cmd_models_tiny

    written = []
    monkeypatch.setattr(
        pipeline.tiny, "write_tiny_models", lambda root: written.append(root) or root
    )
    assert cmd_models_tiny(argparse.Namespace(dir=str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert written == [tmp_path]
    assert "non-commercial research only (deepinsight/insightface#2486)" in out
