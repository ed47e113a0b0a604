"""Training runs: jobs get a kind; a training job's run, loss curve, checkpoints and
validation scores.

Why: `ipbatch train` fine-tunes an adapter as a job on the `train` queue (or in-process on
one machine). The ledger stays the truth for it as for generation: a worker that dies resumes
from the checkpoint recorded here, and `ipbatch status` / `report` read the curve from here.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UtcDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UTC_TIME = UtcDateTime()


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["job_id"], ["jobs.id"], name=op.f(f"fk_{table}_job_id_jobs"), ondelete="CASCADE"
    )


def upgrade() -> None:
    # a plain ADD COLUMN (a constant default is allowed on SQLite): no table copy, so the
    # job_progress view naming jobs stays as it is
    op.add_column(
        "jobs", sa.Column("kind", sa.String(16), nullable=False, server_default="generate")
    )
    op.create_table(
        "training_runs",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("learning_rate", sa.Float(), nullable=True),
        sa.Column("examples", sa.Integer(), nullable=True),
        sa.Column("skipped", sa.JSON(), nullable=True),
        sa.Column("adapter_uri", sa.Text(), nullable=True),
        sa.Column("card", sa.JSON(), nullable=True),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        _job_fk("training_runs"),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_training_runs")),
        sa.UniqueConstraint("name", name=op.f("uq_training_runs_name")),
    )
    op.create_table(
        "training_log",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("learning_rate", sa.Float(), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        _job_fk("training_log"),
        sa.PrimaryKeyConstraint("job_id", "step", name=op.f("pk_training_log")),
    )
    op.create_table(
        "training_checkpoints",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        _job_fk("training_checkpoints"),
        sa.PrimaryKeyConstraint("job_id", "step", name=op.f("pk_training_checkpoints")),
    )
    op.create_table(
        "training_validations",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("clip_i", sa.Float(), nullable=False),
        sa.Column("clip_t", sa.Float(), nullable=True),
        sa.Column("samples", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        _job_fk("training_validations"),
        sa.PrimaryKeyConstraint("job_id", "step", name=op.f("pk_training_validations")),
    )


def downgrade() -> None:
    for table in ("training_validations", "training_checkpoints", "training_log", "training_runs"):
        op.drop_table(table)
    op.drop_column("jobs", "kind")  # SQLite >= 3.35 drops a column no view names
