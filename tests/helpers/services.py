"""The real services the integration tests use: started when down (scripts/services.sh),
throwaway PostgreSQL databases, and the disruptions tests inflict on them."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PG_ADMIN_URL = os.environ.get("IPBATCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def ensure_services() -> None:
    """PostgreSQL, Redis, RabbitMQ (and Chromium) there, started or installed when missing."""
    subprocess.run(["bash", str(ROOT / "scripts" / "services.sh")], check=True, capture_output=True)


@contextmanager
def temporary_database() -> Iterator[str]:
    """CREATE a uniquely named PostgreSQL database; DROP it (forcing connections off) after."""
    import sqlalchemy as sa

    ensure_services()
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


def restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".")])
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version[-1], "main", "restart"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def terminate_connections(database_url: str) -> int:
    """Cut every connection to the test database (as a network blip or a failover would)."""
    import sqlalchemy as sa

    name = sa.make_url(database_url).database
    admin = sa.create_engine(f"{PG_ADMIN_URL}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": name},
                ).all()
            )
    finally:
        admin.dispose()


def restart_rabbitmq_app(seconds: float) -> None:
    """Stop RabbitMQ's application (every connection drops), wait, start it again."""
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True, timeout=60)
    time.sleep(seconds)
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True, timeout=60)
