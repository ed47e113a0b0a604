"""A PostgreSQL database of its own for one benchmark run."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import sqlalchemy as sa


def throwaway_database(pg_url: str) -> tuple[str, Callable[[], None]]:
    """Create an empty database next to `pg_url`'s: its URL, and the call that drops it."""
    name = f"ipbatch_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    return sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False), drop
