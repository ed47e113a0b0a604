"""Migrations: one head; upgrade -> downgrade -> upgrade on PostgreSQL and SQLite; the
migrated schema matches the models."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.errors import Action, classify
from storage.migrate import alembic_config, downgrade, upgrade
from storage.models import Base

# downgrades drop, and one test renames, the server-wide `ipbatch_reader` role that every other
# test's migrations grant to: these run alone
pytestmark = pytest.mark.disruptive


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("fresh_pg_url"))


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        return set(inspector.get_table_names()) | set(inspector.get_view_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db: str) -> None:
    upgrade(empty_db)
    expected = {
        "jobs",
        "items",
        "item_events",
        "embeddings",
        "item_embeddings",
        "item_inputs",
        "outputs",
        "job_item_counts",
        "output_attempts",
        "job_events",
        "job_progress",
        "training_runs",
        "training_log",
        "training_checkpoints",
        "training_validations",
        "workers",
        "job_turns",
        "alembic_version",
    }
    assert _tables(empty_db) == expected
    downgrade(empty_db, "base")
    assert _tables(empty_db) == {"alembic_version"}
    upgrade(empty_db)  # enum types were dropped too, or this fails on PostgreSQL
    assert _tables(empty_db) == expected


def test_migrated_schema_matches_models(empty_db: str) -> None:
    upgrade(empty_db)
    engine = sa.create_engine(empty_db)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_enum_rejects_unknown_status(empty_db: str) -> None:
    upgrade(empty_db)
    engine = sa.create_engine(empty_db)
    with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, name, manifest_uri, manifest_sha256, output_uri, status, "
                "created_at) VALUES ('j', 'n', 'm', 's', 'o', 'bogus', CURRENT_TIMESTAMP)"
            )
        )
    engine.dispose()


def test_counters_are_backfilled_from_existing_items(empty_db: str) -> None:
    """A ledger created before revision 0002 gets its status counters counted once."""
    upgrade(empty_db, "0001")
    engine = sa.create_engine(empty_db)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, name, manifest_uri, manifest_sha256, output_uri, status, "
                "created_at) VALUES ('j', 'n', 'm', 's', 'o', 'running', CURRENT_TIMESTAMP)"
            )
        )
        for i, status in enumerate(["pending", "pending", "running", "succeeded", "failed"]):
            conn.execute(
                sa.text(
                    "INSERT INTO items (job_id, row_index, status, attempts, updated_at) "
                    "VALUES ('j', :i, :s, 0, CURRENT_TIMESTAMP)"
                ),
                {"i": i, "s": status},
            )
    upgrade(empty_db)
    query = "SELECT total, pending, running, succeeded, failed, percent_done FROM job_progress"
    with engine.begin() as conn:
        total, pending, running, succeeded, failed, percent = conn.execute(sa.text(query)).one()
    assert (total, pending, running, succeeded, failed) == (5, 2, 1, 1, 1)
    assert float(percent) == 40.0
    downgrade(empty_db, "0001")  # the old view, counting items, comes back
    with engine.begin() as conn:
        assert conn.execute(sa.text(query)).one()[:5] == (5, 2, 1, 1, 1)
    engine.dispose()


def test_reader_role_reads_and_cannot_write(fresh_pg_url: str) -> None:
    """`ipbatch_reader` (revision 0004) can read every table and the view, and write none."""
    import uuid

    upgrade(fresh_pg_url)
    login = f"reader_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(fresh_pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {login} LOGIN IN ROLE ipbatch_reader"))
    url = sa.make_url(fresh_pg_url).set(username=login)
    reader = sa.create_engine(url)
    try:
        with reader.connect() as conn:
            for table in (
                "jobs",
                "items",
                "item_events",
                "job_events",
                "outputs",
                "embeddings",
                "job_progress",
            ):
                conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied") as caught:
            with reader.begin() as conn:
                conn.execute(sa.text("DELETE FROM items"))
        # said as what it is (not "the schema does not match: run ipbatch db upgrade")
        decision = classify(caught.value)
        assert decision.action is Action.CONFIG and "db upgrade" not in decision.message
        assert "permission denied for the database user of IPBATCH_DATABASE_URL" in decision.message
        assert "permission denied for table items" in decision.message
        from helpers.cli import ipbatch
        from sqlalchemy.orm import Session

        from core.clock import utcnow
        from storage.ledger import jobs

        writer = sa.create_engine(fresh_pg_url)
        with Session(writer) as session, session.begin():
            jobs.create(  # a job whose counters `db recount` rewrites
                session, name="j", manifest_uri="m", manifest_sha256="a" * 64,
                output_uri="/o", now=utcnow(),
            )  # fmt: skip
        writer.dispose()
        as_reader = {"IPBATCH_DATABASE_URL": url.render_as_string(hide_password=False)}
        recount = ipbatch("db", "recount", env=as_reader)  # it writes: the reader may not
        assert recount.returncode == 2 and "Traceback" not in recount.stderr
        assert "permission denied for the database user of IPBATCH_DATABASE_URL" in recount.stderr
    finally:
        reader.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP ROLE {login}"))
        admin.dispose()


def test_db_upgrade_says_what_to_do_without_createrole(fresh_pg_url: str) -> None:
    """A migrating user that owns its database but may not create roles, on a cluster
    without `ipbatch_reader` yet: `db upgrade` ends in one line saying what to run as a
    superuser (exit 2), not a stack trace; with the role made, it goes through."""
    import uuid

    from helpers.cli import ipbatch

    login = f"migrator_{uuid.uuid4().hex[:8]}"
    parked = f"ipbatch_reader_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(fresh_pg_url, isolation_level="AUTOCOMMIT")
    database = sa.make_url(fresh_pg_url).database
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {login} LOGIN NOCREATEROLE"))
        conn.execute(sa.text(f'ALTER DATABASE "{database}" OWNER TO {login}'))
        conn.execute(sa.text(f"ALTER SCHEMA public OWNER TO {login}"))
        had_reader = conn.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = 'ipbatch_reader'")
        ).scalar()
        if had_reader:  # the role is cluster-wide: set aside for this test (grants kept)
            conn.execute(sa.text(f"ALTER ROLE ipbatch_reader RENAME TO {parked}"))
    url = sa.make_url(fresh_pg_url).set(username=login).render_as_string(hide_password=False)
    try:
        refused = ipbatch("db", "upgrade", env={"IPBATCH_DATABASE_URL": url})
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr
        assert f"{login} may not create it (no CREATEROLE)" in refused.stderr
        assert '"CREATE ROLE ipbatch_reader NOLOGIN"' in refused.stderr
        with admin.connect() as conn:
            if had_reader:
                conn.execute(sa.text(f"ALTER ROLE {parked} RENAME TO ipbatch_reader"))
                had_reader = None
            else:
                conn.execute(sa.text("CREATE ROLE ipbatch_reader NOLOGIN"))
        done = ipbatch("db", "upgrade", env={"IPBATCH_DATABASE_URL": url})
        assert done.returncode == 0, done.stderr
    finally:
        with admin.connect() as conn:
            if had_reader:
                conn.execute(sa.text(f"ALTER ROLE {parked} RENAME TO ipbatch_reader"))
            conn.execute(sa.text(f'ALTER DATABASE "{database}" OWNER TO postgres'))
            conn.execute(sa.text(f"REASSIGN OWNED BY {login} TO postgres"))
            conn.execute(sa.text(f"DROP OWNED BY {login}"))
            conn.execute(sa.text(f"DROP ROLE {login}"))
        admin.dispose()


def test_two_databases_migrated_at_once_both_get_the_reader_role() -> None:
    """Roles are server-wide: while one database's migration has created `ipbatch_reader` but
    not committed, another's sees no role and creates it too, and waits on the first. When the
    first commits, the second goes on with the role the first made (before revision 0004
    caught it: a UniqueViolation on pg_authid, found by running these tests two at a time).
    The first migration's uncommitted CREATE ROLE is held here by hand, so the order is
    forced, not raced."""
    import threading
    import uuid

    from helpers.services import PG_ADMIN_URL, temporary_database

    parked = f"ipbatch_reader_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{PG_ADMIN_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        had_reader = conn.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = 'ipbatch_reader'")
        ).scalar()
        if had_reader:  # set aside (grants kept) so that the role is missing for this test
            conn.execute(sa.text(f"ALTER ROLE ipbatch_reader RENAME TO {parked}"))
    failures: list[BaseException] = []
    try:
        with temporary_database() as first, temporary_database() as second:
            first_engine = sa.create_engine(first)
            holder = first_engine.connect()
            holder.execute(sa.text("CREATE ROLE ipbatch_reader NOLOGIN"))  # not committed

            def migrate() -> None:
                try:
                    upgrade(second)
                except BaseException as exc:  # handed to the test's thread
                    failures.append(exc)

            migrating = threading.Thread(target=migrate)
            migrating.start()
            waiting = sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :db "
                "AND wait_event_type = 'Lock'"
            )
            with admin.connect() as conn:  # the second migration blocks on the first's role
                while not conn.execute(waiting, {"db": sa.make_url(second).database}).scalar():
                    assert migrating.is_alive(), failures
                    threading.Event().wait(0.05)
            holder.commit()
            holder.close()
            first_engine.dispose()
            migrating.join(timeout=120)
            assert not migrating.is_alive() and not failures, failures
            second_engine = sa.create_engine(second)
            with second_engine.connect() as conn:
                grantees = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM information_schema.role_table_grants "
                        "WHERE grantee = 'ipbatch_reader' AND table_name = 'jobs'"
                    )
                ).scalar()
            second_engine.dispose()
            assert grantees == 1
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text("DROP ROLE IF EXISTS ipbatch_reader"))
            if had_reader:
                conn.execute(sa.text(f"ALTER ROLE {parked} RENAME TO ipbatch_reader"))
        admin.dispose()
