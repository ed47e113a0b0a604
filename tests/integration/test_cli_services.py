"""The command line against real services: secrets stay out of its output, the reaper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from helpers.cli import free_port, ipbatch

from core.config import Settings, redact_url


def test_secrets_never_printed(pg_url: str) -> None:
    with_password = pg_url.replace("postgres@", "postgres:hunter2-secret@")
    result = ipbatch("db", "upgrade", env={"IPBATCH_DATABASE_URL": with_password})
    assert result.returncode == 0, result.stderr
    assert "hunter2-secret" not in result.stdout + result.stderr
    assert "postgres:***@" in result.stdout
    settings = Settings(
        database_url=with_password,  # type: ignore[arg-type]
        broker_url="amqp://u:brokerpw@h//",
    )  # type: ignore[arg-type]
    assert "hunter2-secret" not in repr(settings) and "brokerpw" not in repr(settings)
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("sqlite:///x.db") == "sqlite:///x.db"


def test_reaper_once(tmp_path: Path) -> None:
    env = {"IPBATCH_HOME": str(tmp_path / "home")}
    assert ipbatch("db", "upgrade", env=env).returncode == 0
    result = ipbatch("reaper", "--once", env=env)
    assert result.returncode == 0, result.stderr
    assert "0 items and 0 jobs queued again" in result.stdout
    env["IPBATCH_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}//"  # nobody there
    result = ipbatch("reaper", "--once", env=env)
    assert result.returncode == 3 and "database or broker unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_says_when_the_job_exists_and_reruns_it_on_request(make_cluster: Any) -> None:
    """The same manifest and output again return the job that has them, said on stderr (with
    a --name that is not applied); once it has ended, `submit --rerun` makes run 2."""
    cluster = make_cluster()
    manifest = cluster.put_manifest("m.jsonl", [{"id": "a", "reference": "s3://x/refs/a.png"}])
    output = f"s3://{cluster.bucket}/out"
    first = cluster.cli("submit", manifest, "--output", output).strip()
    again = ipbatch("submit", manifest, "--output", output, "--name", "tuesday", env=cluster.env)
    assert again.returncode == 0 and again.stdout.strip() == first
    assert f"job {first} ('m.jsonl', pending) already has this manifest and output" in again.stderr
    assert "--name 'tuesday' is ignored" in again.stderr
    cluster.cli("cancel", first)
    ended = ipbatch("submit", manifest, "--output", output, env=cluster.env)
    assert f"`ipbatch rerun {first}` (or submit --rerun) runs it again" in ended.stderr
    second = cluster.cli("submit", manifest, "--output", output, "--rerun").strip()
    assert second != first and cluster.progress(second)["status"] == "pending"
    with cluster.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT run, rerun_of FROM jobs WHERE id = :j"), {"j": second})
        assert row.one() == (2, first)
    running = ipbatch("rerun", second, env=cluster.env)
    assert running.returncode == 2 and "still pending: cancel it first" in running.stderr
