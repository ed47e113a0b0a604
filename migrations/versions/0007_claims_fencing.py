"""Fencing tokens on claims, the ingest's claim on its job, and a job history.

Why: a worker whose lease lapsed (a long pause, a stopped VM that comes back) could still
release, fail or complete items another worker had claimed since, and re-upload images it no
longer owned. Each claim now carries a token (`items.lease_token`); every write for a claimed
item checks it. Ingest claims its job the same way (`jobs.lease_token`, `jobs.lease_until`),
so a lost or duplicated ingest message is recovered by the reaper or a resubmit without two
ingests writing at once; `jobs.updated_at` tells the reaper how long a job has waited, and
`job_events` records every job transition like `item_events` does for items.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context, op

from storage.models import UtcDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("items", sa.Column("lease_token", sa.String(32), nullable=True))
    op.add_column("jobs", sa.Column("lease_token", sa.String(32), nullable=True))
    op.add_column("jobs", sa.Column("lease_until", UtcDateTime(), nullable=True))
    op.add_column("jobs", sa.Column("updated_at", UtcDateTime(), nullable=True))
    op.execute("UPDATE jobs SET updated_at = COALESCE(finished_at, started_at, created_at)")
    with _without_progress_view(), op.batch_alter_table("jobs") as batch:
        batch.alter_column("updated_at", existing_type=UtcDateTime(), nullable=False)
    op.create_table(
        "job_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("worker", sa.String(256), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index(op.f("ix_job_events_job_id"), "job_events", ["job_id"])
    # (PostgreSQL: ipbatch_reader may read job_events through revision 0004's default privileges)


def downgrade() -> None:
    op.drop_index(op.f("ix_job_events_job_id"), table_name="job_events")
    op.drop_table("job_events")
    with _without_progress_view(), op.batch_alter_table("jobs") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("lease_until")
        batch.drop_column("lease_token")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("lease_token")


@contextmanager
def _without_progress_view() -> Iterator[None]:
    """SQLite changes a column by copying the table, which a view naming it forbids: drop
    job_progress meanwhile and create it again (revision 0002's view, unchanged since)."""
    op.execute("DROP VIEW job_progress")
    yield
    counters = context.script.get_revision("0002")
    assert counters is not None
    op.execute(counters.module.JOB_PROGRESS_VIEW)
