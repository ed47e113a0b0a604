"""outputs.fingerprint, outputs.reused_from and outputs.gpu_seconds; jobs.reuse.

Why: a catalog's nightly manifest is mostly last night's rows, and every row was generated
again. An output now records its generation's fingerprint (`pipeline.fingerprint`: weights by
content, backend, every call input of the row, cached input keys, scoring, image index),
indexed, so a row whose images were all made before is copied instead of generated
(`workers.stages.reuse`); `reused_from` names the output it was copied from (an id, not a
foreign key: the output it came from may be forgotten later, the copy stands on its own);
`jobs.reuse` is false for a job submitted with `--no-reuse`. `gpu_seconds`: what the image
cost the GPU (its diffusers call's seconds shared by the call's images, plus the row's
regenerations under a score threshold; 0 for a copy), so a job's cost is a sum.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outputs", sa.Column("fingerprint", sa.String(64), nullable=True))
    op.add_column("outputs", sa.Column("reused_from", sa.BigInteger(), nullable=True))
    op.add_column("outputs", sa.Column("gpu_seconds", sa.Float(), nullable=True))
    op.create_index("ix_outputs_fingerprint", "outputs", ["fingerprint"])
    op.add_column(
        "jobs", sa.Column("reuse", sa.Boolean(), nullable=False, server_default=sa.true())
    )


def downgrade() -> None:
    op.drop_index("ix_outputs_fingerprint", table_name="outputs")
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("gpu_seconds")
        batch.drop_column("reused_from")
        batch.drop_column("fingerprint")
    op.execute("DROP VIEW job_progress")  # SQLite drops a column by copying the table
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reuse")
    counters = context.script.get_revision("0002")
    assert counters is not None
    op.execute(counters.module.JOB_PROGRESS_VIEW)
