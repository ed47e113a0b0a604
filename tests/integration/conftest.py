"""Fixtures that start or use real services: a throwaway PostgreSQL database, moto's S3
server over HTTP, a RabbitMQ vhost, a Redis database. A service that is down is started by
scripts/services.sh, never skipped."""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import free_port
from helpers.services import ensure_services, temporary_database


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A migrated ledger (engine) on SQLite, then on a fresh PostgreSQL database."""
    from storage.ledger import db
    from storage.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture()
def sessions(ledger_engine: Any) -> Any:
    """The `ledger_engine`'s sessionmaker."""
    from storage.ledger import db

    return db.make_sessions(ledger_engine)


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
    ensure_services()
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


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[str]:
    """A Redis database number of our own, flushed at the end."""
    import redis

    ensure_services()
    db = random.randint(1, 15)
    yield f"redis://127.0.0.1:6379/{db}"
    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
