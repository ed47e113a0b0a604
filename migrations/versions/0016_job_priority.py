"""jobs.priority: low (0), normal (1, the default), high (2).

Why: queues were first in, first out across jobs: a 2-row job submitted behind a
1,000,000-row job waited for all of it. A job's messages now carry its priority (the broker
delivers higher ones first: RabbitMQ's x-max-priority queues, Redis's priority steps), so a
small urgent job overtakes the backlog of a large ordinary one.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    op.execute("DROP VIEW job_progress")  # SQLite drops a column by copying the table
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
    counters = context.script.get_revision("0002")
    assert counters is not None
    op.execute(counters.module.JOB_PROGRESS_VIEW)
