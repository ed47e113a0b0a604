"""items.warning: an item that succeeded but deserves a look (e.g. a truncated prompt).

Why: a prompt longer than the text encoder's 77 tokens is truncated by diffusers with only a
log line; users should see it next to the row, with SQL, without failing the row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("warning", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:  # SQLite copies the table to drop a column
        batch.drop_column("warning")
