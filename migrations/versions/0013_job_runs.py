"""Runs of a job: jobs.run and jobs.rerun_of; a manifest and output may be run again.

Why: the same manifest bytes and output give the same job (a resubmit after a failed publish
must not make a second job), so a cancelled or finished job could not be run again: `submit`
returned the ended job. `ipbatch rerun JOB` (or `submit --rerun`) makes run N+1 of the same
manifest and output, linked to the run it repeats, with its own id and outputs; a plain
`submit` still returns the newest run.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context, op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with _without_progress_view(), op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("run", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("rerun_of", sa.String(32), nullable=True))
        batch.drop_constraint("uq_jobs_manifest_sha256", type_="unique")
        batch.create_unique_constraint(
            "uq_jobs_manifest_sha256", ["manifest_sha256", "output_uri", "run"]
        )
        batch.create_foreign_key(
            "fk_jobs_rerun_of_jobs", "jobs", ["rerun_of"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    # later runs cannot keep the old key: only each manifest's first run stays
    op.execute("DELETE FROM jobs WHERE run > 1")
    with _without_progress_view(), op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_rerun_of_jobs", type_="foreignkey")
        batch.drop_constraint("uq_jobs_manifest_sha256", type_="unique")
        batch.create_unique_constraint("uq_jobs_manifest_sha256", ["manifest_sha256", "output_uri"])
        batch.drop_column("rerun_of")
        batch.drop_column("run")


@contextmanager
def _without_progress_view() -> Iterator[None]:
    """SQLite changes a table's constraints by copying it, which a view naming it forbids:
    drop job_progress meanwhile and create it again (revision 0002's view, unchanged since)."""
    op.execute("DROP VIEW job_progress")
    yield
    counters = context.script.get_revision("0002")
    assert counters is not None
    op.execute(counters.module.JOB_PROGRESS_VIEW)
