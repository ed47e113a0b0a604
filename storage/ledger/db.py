"""Engines and sessions for the ledger (PostgreSQL in production, SQLite on one machine)."""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool


def worker_name() -> str:
    """Who did it, in `item_events.worker`: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine for the ledger; `pooled=False` for a process that connects now and then
    (a metrics scrape), so it keeps no connection between uses."""
    if not pooled:
        return create_engine(url, poolclass=NullPool)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def upsert(session: Session, table: Any) -> Any:
    """`INSERT ... ON CONFLICT` for this session's database (`.on_conflict_do_update` next)."""
    return (postgresql_insert if is_postgres(session) else sqlite_insert)(table)
