"""Structure inputs of an item: control images, region masks, init image, inpaint mask.

Why: rows may now carry ControlNet conditions, regional IP-Adapter masks and a source image
(img2img, inpainting). The embed stage reads and prepares them once, caches the pixels in the
embedding cache (encoder "inputs-v1"), and links each item to them here, as `item_embeddings`
does for reference embeddings; the generate stage reads the cache only.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "item_inputs",
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("owner_index", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("embedding_id", BIG_ID, nullable=False),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_item_inputs_item_id_items"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["embedding_id"],
            ["embeddings.id"],
            name=op.f("fk_item_inputs_embedding_id_embeddings"),
        ),
        sa.PrimaryKeyConstraint(
            "item_id", "role", "owner_index", "position", name=op.f("pk_item_inputs")
        ),
    )
    op.create_index(op.f("ix_item_inputs_embedding_id"), "item_inputs", ["embedding_id"])
    # (PostgreSQL: ipbatch_reader may read item_inputs through revision 0004's default privileges)


def downgrade() -> None:
    op.drop_index(op.f("ix_item_inputs_embedding_id"), table_name="item_inputs")
    op.drop_table("item_inputs")
