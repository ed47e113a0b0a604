"""workers: each worker process's queues, state, current work, loaded models and heartbeat.

Why: a worker that cannot work must be visible. `ipbatch workers` lists them, `ipbatch status`
says when a stage's queue has no live worker, and the metrics count consumers per queue and
workers stopped by a configuration error: from the ledger, the same with RabbitMQ or Redis.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UtcDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (PostgreSQL: ipbatch_reader may read workers through revision 0004's default privileges)
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("problem", sa.Text(), nullable=True),
        sa.Column("models", sa.JSON(), nullable=True),
        sa.Column("current", sa.JSON(), nullable=True),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("heartbeat_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
