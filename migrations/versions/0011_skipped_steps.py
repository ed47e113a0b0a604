"""training_runs.skipped_steps, training_log.skipped_steps: fp16 training's skipped steps.

Why: fp16 training scales the loss (a gradient scaler, as accelerate does for tencent's
script) and skips an optimizer step whose gradients overflow, halving the scale. A few such
steps early in a run are normal; many say the run is not learning. The run's total and each
logged point's count (steps skipped since the previous point) are recorded. Existing rows: 0
(before this revision fp16 ran unscaled and skipped nothing).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLES = ("training_runs", "training_log")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(
            table, sa.Column("skipped_steps", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite copies the table to drop a column
            batch.drop_column("skipped_steps")
