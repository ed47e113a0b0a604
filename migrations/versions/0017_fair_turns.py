"""job_turns: when each job last had a turn in each item stage; items indexed for a turn.

Why: jobs of one priority level were served first in, first out: a 2-row job submitted
behind a 1,000,000-row job of the same level waited for all of it. A distributed worker now
gives each message's turn to the job of the highest level that waited longest for the stage
(`storage.ledger.items.next_turn`), and needs two things for that to stay cheap at a million
waiting items: when each job last had a turn (this table, one row per job and stage), and
the waiting items of one job in id order straight from an index ((job_id, status, id)
replaces (job_id, status), which served only the first two columns of that); and the
running jobs without reading every job ever run (jobs.status: 1.2 ms -> 0.07 ms for the
turn's pick among 10,000 ended jobs).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UtcDateTime

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_turns",
        sa.Column(
            "job_id",
            sa.String(32),
            sa.ForeignKey("jobs.id", ondelete="CASCADE", name="fk_job_turns_job_id_jobs"),
            primary_key=True,
        ),
        sa.Column("stage", sa.String(16), primary_key=True),
        sa.Column("served_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_items_job_id_status_id", "items", ["job_id", "status", "id"])
    op.drop_index("ix_items_job_id_status", table_name="items")
    op.create_index("ix_jobs_status", "jobs", ["status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.create_index("ix_items_job_id_status", "items", ["job_id", "status"])
    op.drop_index("ix_items_job_id_status_id", table_name="items")
    op.drop_table("job_turns")
