"""The command line against real services: secrets stay out of its output, the reaper."""

from __future__ import annotations

from pathlib import Path

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
    assert result.returncode == 2 and "database or broker unreachable" in result.stderr
    assert "Traceback" not in result.stderr
