"""Shared fixtures: tiny models, a throwaway PostgreSQL database, an S3 server over HTTP,
a RabbitMQ vhost. Services that are down are started by scripts/services.sh, never skipped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("IPBATCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def _ensure_services() -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "services.sh")], check=True, capture_output=True)


def ipbatch(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real `ipbatch` command in a subprocess; `env` is laid over this environment."""
    return subprocess.run(
        [sys.executable, "-m", "ipbatch.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A migrated ledger (engine) on SQLite, then on a fresh PostgreSQL database."""
    from storage import ledger
    from storage.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    engine = ledger.make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture()
def sessions(ledger_engine: Any) -> Any:
    """The `ledger_engine`'s sessionmaker."""
    from storage import ledger

    return ledger.make_sessions(ledger_engine)


def ingested_job(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    *,
    manifest: Path,
    output: Path,
    **settings: Any,
) -> tuple[Any, str, list[int]]:
    """A one-machine job registered and ingested through the stages, with the ledger and
    models of `env` (IPBATCH_HOME, IPBATCH_MODELS) and `settings` on top: (stage context,
    job id, its pending item ids). The caller closes the context."""
    from core.config import Settings
    from storage import ledger
    from storage.migrate import upgrade
    from storage.models import ItemStatus
    from workers import stages
    from workers.context import StageContext

    for key in ("IPBATCH_HOME", "IPBATCH_MODELS"):
        monkeypatch.setenv(key, env[key])
    config = Settings(**settings)
    upgrade(config.ledger_url())
    ctx = StageContext.create(config, mode="local")
    job_id, _ = stages.register_job(ctx, manifest_uri=str(manifest), output_uri=str(output))
    stages.ingest(ctx, job_id=job_id, enqueue=lambda ids: None)
    with ctx.sessions.begin() as s:
        [pending] = ledger.iter_id_pages(s, job_id=job_id, statuses=[ItemStatus.PENDING])
    return ctx, job_id, pending


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@contextmanager
def temporary_database() -> Iterator[str]:
    """CREATE a uniquely named PostgreSQL database; DROP it (forcing connections off) after."""
    import sqlalchemy as sa

    _ensure_services()
    name = f"ipbatch_test_{uuid.uuid4().hex[:10]}"
    # pre-ping: a test may restart PostgreSQL before this engine drops the database
    admin = sa.create_engine(
        f"{PG_ADMIN_URL}/postgres", isolation_level="AUTOCOMMIT", pool_pre_ping=True
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_URL}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    with temporary_database() as url:
        yield url


@pytest.fixture()
def fresh_pg_url() -> Iterator[str]:
    """A database of its own for one test (migration tests need an empty one)."""
    with temporary_database() as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server over real HTTP on a free local port."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"bucket-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def rabbit_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this session's own, so stray messages of other runs never reach
    our workers; deleted at the end."""
    _ensure_services()
    vhost = f"ipbatch-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)


@pytest.fixture()
def reference_images(tmp_path: Path) -> dict[str, Path]:
    """Three distinct small reference images on disk."""
    from PIL import Image, ImageDraw

    paths = {}
    for name, colour in (("red", (200, 30, 40)), ("blue", (30, 60, 170)), ("green", (40, 150, 70))):
        image = Image.new("RGB", (96, 80), (240, 240, 235))
        ImageDraw.Draw(image).ellipse((10, 10, 80, 70), fill=colour)
        path = tmp_path / "refs" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        paths[name] = path
    return paths
