"""output_attempts: every image generated for an output slot, with its seed and scores.

Why: with IPBATCH_SCORE_THRESHOLD an image whose CLIP-I is below the threshold is generated
again with the next seed (bounded tries); users must be able to see every attempt, not only
the one kept in `outputs`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "output_attempts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("image_index", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("clip_i", sa.Float(), nullable=True),
        sa.Column("clip_t", sa.Float(), nullable=True),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["items.id"],
            name=op.f("fk_output_attempts_item_id_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_output_attempts")),
        sa.UniqueConstraint(
            "item_id", "image_index", "attempt", name=op.f("uq_output_attempts_item_id")
        ),
    )


def downgrade() -> None:
    op.drop_table("output_attempts")
