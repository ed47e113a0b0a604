"""A word when a job ends: jobs.results_uri, and the webhook's URL, attempts and delivery.

Why: people without SQL need each job's outcome where its images are, and a night nobody
watches needs a call when a job ends. When a job ends (and none of its items is still in
flight) `{output}/{job}/results.jsonl` is written and its URI recorded; a job submitted with a
webhook (`submit --webhook` or IPBATCH_WEBHOOK_URL) gets its summary POSTed, retried with
backoff (`webhook_attempts`, `webhook_after`) by the reaper until `notified_at` is set.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import context, op

from storage.models import UtcDateTime

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

COLUMNS = ("results_uri", "webhook_url", "webhook_attempts", "webhook_after", "notified_at")


def upgrade() -> None:
    # plain ADD COLUMNs (no table copy on SQLite: the job_progress view stays as it is)
    op.add_column("jobs", sa.Column("results_uri", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("webhook_url", sa.Text(), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("jobs", sa.Column("webhook_after", UtcDateTime(), nullable=True))
    op.add_column("jobs", sa.Column("notified_at", UtcDateTime(), nullable=True))


def downgrade() -> None:
    op.execute("DROP VIEW job_progress")  # SQLite drops a column by copying the table
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column)
    counters = context.script.get_revision("0002")
    assert counters is not None
    op.execute(counters.module.JOB_PROGRESS_VIEW)
