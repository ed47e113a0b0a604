"""A read-only role, `ipbatch_reader`, for people who query status by SQL (PostgreSQL only).

Why: users read progress, failures and outputs straight from the ledger; they should do so
without the rights of the workers. The role cannot log in: give it to a login role, e.g.
`CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE ipbatch_reader`. Tables created by later
migrations are readable by it too (default privileges). Roles are shared by every database of
a PostgreSQL cluster, so the role is created only if missing and dropped only if no other
database still uses it. SQLite has no roles: nothing to do there.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ipbatch_reader') THEN
                BEGIN
                    CREATE ROLE ipbatch_reader NOLOGIN;
                EXCEPTION WHEN unique_violation OR duplicate_object THEN
                    -- roles are server-wide: another database's migration, running at the
                    -- same time (two deployments, the test suite's workers), made it first
                    NULL;
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION USING
                        ERRCODE = 'insufficient_privilege',
                        MESSAGE = format(
                            'the read-only role ipbatch_reader does not exist and %s may not '
                            'create it (no CREATEROLE): create it once as a superuser with '
                            '"CREATE ROLE ipbatch_reader NOLOGIN", then run ipbatch db '
                            'upgrade again', current_user);
                END;
            END IF;
            EXECUTE format('GRANT CONNECT ON DATABASE %I TO ipbatch_reader', current_database());
        END
        $$
        """
    )
    op.execute("GRANT USAGE ON SCHEMA public TO ipbatch_reader")
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO ipbatch_reader")
    op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO ipbatch_reader")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # DROP OWNED BY removes the role's privileges and default privileges in this database
    op.execute("DROP OWNED BY ipbatch_reader")
    op.execute(
        """
        DO $$
        BEGIN
            EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM ipbatch_reader', current_database());
            DROP ROLE ipbatch_reader;
        EXCEPTION WHEN dependent_objects_still_exist THEN
            NULL;  -- another database still grants it something: keep the role
        END
        $$
        """
    )
