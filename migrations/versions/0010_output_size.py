"""outputs.size: the byte count of each recorded image.

Why: `ipbatch verify` checks a million outputs with one HEAD each; a HEAD gives the object's
size, so the ledger must know the size the worker wrote. A recorded image must be a complete
image (a worker killed mid-upload once left a 0-byte object that was recorded as the result).
Rows recorded before this revision have no size: verify checks their existence (and, with
--deep, their sha256) only.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outputs", sa.Column("size", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:  # SQLite copies the table to drop a column
        batch.drop_column("size")
