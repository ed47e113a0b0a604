"""Job outcomes a script can use: the `partial` status, and jobs.max_failures.

Why: a job where 9 of 10 rows succeeded was `failed`, like one where nothing did. Now a job
ends `succeeded` (every row), `partial` (some rows failed, some succeeded) or `failed` (no row
succeeded, or the manifest could not be read). `max_failures` (from `submit --max-failures`):
a job whose failed rows pass it stops itself early, the rest cancelled with the reason; a
number >= 1 counts rows, a fraction below 1 is a share of the manifest's rows.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context, op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

BEFORE = ("pending", "running", "succeeded", "failed", "cancelled")
AFTER = (*BEFORE, "partial")


def _check(statuses: tuple[str, ...]) -> str:
    return "status IN ({})".format(", ".join(f"'{s}'" for s in statuses))


def upgrade() -> None:
    op.add_column("jobs", sa.Column("max_failures", sa.Float(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():  # ADD VALUE cannot run in a transaction
            op.execute("ALTER TYPE job_status ADD VALUE IF NOT EXISTS 'partial'")
        return
    with _without_progress_view(), op.batch_alter_table("jobs") as batch:  # SQLite's CHECK
        batch.drop_constraint(op.f("ck_jobs_job_status"), type_="check")
        batch.create_check_constraint("job_status", _check(AFTER))


def downgrade() -> None:
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'partial'")
    if op.get_bind().dialect.name == "postgresql":
        # PostgreSQL cannot drop an enum value: the type is made again without it
        op.execute("DROP VIEW job_progress")
        op.execute("ALTER TYPE job_status RENAME TO job_status_old")
        op.execute(
            "CREATE TYPE job_status AS ENUM ({})".format(", ".join(f"'{s}'" for s in BEFORE))
        )
        op.execute(
            "ALTER TABLE jobs ALTER COLUMN status TYPE job_status USING status::text::job_status"
        )
        op.execute("DROP TYPE job_status_old")
        _create_progress_view()
        op.drop_column("jobs", "max_failures")
        return
    with _without_progress_view(), op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_job_status"), type_="check")
        batch.create_check_constraint("job_status", _check(BEFORE))
        batch.drop_column("max_failures")


def _create_progress_view() -> None:
    counters = context.script.get_revision("0002")
    assert counters is not None
    op.execute(counters.module.JOB_PROGRESS_VIEW)


@contextmanager
def _without_progress_view() -> Iterator[None]:
    """SQLite changes a table's constraints by copying it, which a view naming it forbids:
    drop job_progress meanwhile and create it again (revision 0002's view, unchanged since)."""
    op.execute("DROP VIEW job_progress")
    yield
    _create_progress_view()
