"""Fixtures that start or use real services: a throwaway PostgreSQL database, moto's S3
server over HTTP, a RabbitMQ vhost, a Redis database. A service that is down is started by
scripts/services.sh, never skipped."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import free_port
from helpers.cluster import REAPER_EVERY
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
    # one database per pytest-xdist worker (gw0 -> 1, gw1 -> 2...), 15 without xdist: two
    # sessions at once never flush each other's
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    db = int(worker.removeprefix("gw")) + 1 if worker.startswith("gw") else 15
    yield f"redis://127.0.0.1:6379/{db}"
    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()


@pytest.fixture(params=["rabbitmq"])
def broker(request: pytest.FixtureRequest) -> str:
    """RabbitMQ (the default) unless a test asks for another broker by indirect parameter."""
    fixture = {"rabbitmq": "rabbit_vhost", "redis": "redis_broker"}[request.param]
    return str(request.getfixturevalue(fixture))


@pytest.fixture()
def cluster_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """Extra IPBATCH_* settings for the workers: a test parametrizes this (indirectly) with
    a dict, or with the name of a fixture that returns one."""
    param = getattr(request, "param", {})
    if isinstance(param, str):
        return dict(request.getfixturevalue(param))
    return dict(param)


@pytest.fixture()
def flaky_s3(s3_endpoint: str) -> Iterator[Any]:
    from helpers.cluster import FlakyS3

    flaky = FlakyS3()
    yield flaky
    flaky.stop()


@pytest.fixture()
def make_cluster(
    tmp_path: Path,
    fresh_pg_url: str,
    broker: str,
    s3_endpoint: str,
    s3_bucket: str,
    tiny_models: Path,
    cluster_settings: dict[str, str],
) -> Iterator[Any]:
    """Builds a Cluster (nothing started) over this test's services, with a database of its
    own (the embedding cache is global: another test's entries would change what this one
    sees); closed at the end."""
    from helpers.cluster import Cluster

    made: list[Cluster] = []

    def make(**settings: str) -> Cluster:
        cluster = Cluster(
            tmp_path=tmp_path,
            database_url=fresh_pg_url,
            broker_url=broker,
            s3_endpoint=s3_endpoint,
            bucket=s3_bucket,
            models=tiny_models,
            settings={
                **{k: v for k, v in cluster_settings.items() if k != REAPER_EVERY},
                **settings,
            },
        )
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


@pytest.fixture()
def cluster(make_cluster: Any, cluster_settings: dict[str, str]) -> Any:
    """Two workers on different queues, as on two machines (CPU embedding, GPU generation),
    and with REAPER_EVERY in the settings the deployment's reaper."""
    cluster = make_cluster()
    cluster.start_worker("embedder", "ingest,embed")
    cluster.start_worker("generator", "generate")
    if REAPER_EVERY in cluster_settings:
        cluster.start("reaper", "reaper", "--every", cluster_settings[REAPER_EVERY])
    return cluster
