"""The ledger: jobs, items (+ event history), embeddings, outputs, the job_progress view.

Why: every stage claims work with guarded status transitions on `items`, the embedding cache
is indexed by (content_sha256, encoder, kind), and users read progress from `job_progress`.
The (job_id, status) index keeps status counts fast on jobs of a million items.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# frozen here: later revisions replace the view, and this one must keep creating its own
JOB_PROGRESS_VIEW = """
CREATE VIEW job_progress AS
SELECT
    j.id AS job_id,
    j.name AS name,
    j.status AS status,
    COUNT(i.id) AS total,
    SUM(CASE WHEN i.status IN ('pending', 'ready') THEN 1 ELSE 0 END) AS pending,
    SUM(CASE WHEN i.status IN ('embedding', 'running') THEN 1 ELSE 0 END) AS running,
    SUM(CASE WHEN i.status = 'succeeded' THEN 1 ELSE 0 END) AS succeeded,
    SUM(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END) AS failed,
    SUM(CASE WHEN i.status = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,
    CASE WHEN COUNT(i.id) = 0 THEN 0.0
         ELSE ROUND(100.0 * SUM(CASE WHEN i.status IN ('succeeded', 'failed', 'cancelled')
                                     THEN 1 ELSE 0 END) / COUNT(i.id), 1)
    END AS percent_done,
    j.started_at AS started_at,
    j.finished_at AS finished_at
FROM jobs j
LEFT JOIN items i ON i.job_id = j.id
GROUP BY j.id, j.name, j.status, j.started_at, j.finished_at
"""

JOB_STATUS = ("pending", "running", "succeeded", "failed", "cancelled")
ITEM_STATUS = ("pending", "embedding", "ready", "running", "succeeded", "failed", "cancelled")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    job_status = sa.Enum(*JOB_STATUS, name="job_status", create_constraint=True)
    item_status = sa.Enum(*ITEM_STATUS, name="item_status", create_constraint=True)
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("manifest_uri", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("output_uri", sa.Text(), nullable=False),
        sa.Column("status", job_status, nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("total_rows", sa.Integer(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=True),
        sa.Column("finished_at", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("manifest_sha256", "output_uri", name=op.f("uq_jobs_manifest_sha256")),
    )
    op.create_table(
        "items",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("row_id", sa.String(128), nullable=True),
        sa.Column("row_index", sa.Integer(), nullable=False),
        sa.Column("status", item_status, nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("lease_until", UtcDateTime(), nullable=True),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_items_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
        sa.UniqueConstraint("job_id", "row_index", name=op.f("uq_items_job_id")),
    )
    op.create_index("ix_items_job_id_status", "items", ["job_id", "status"])
    op.create_table(
        "item_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("worker", sa.String(256), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["items.id"],
            name=op.f("fk_item_events_item_id_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_item_events")),
    )
    op.create_index(op.f("ix_item_events_item_id"), "item_events", ["item_id"])
    op.create_table(
        "embeddings",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("encoder", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embeddings")),
        sa.UniqueConstraint(
            "content_sha256", "encoder", "kind", name=op.f("uq_embeddings_content_sha256")
        ),
    )
    op.create_table(
        "item_embeddings",
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("adapter_index", sa.Integer(), nullable=False),
        sa.Column("reference_index", sa.Integer(), nullable=False),
        sa.Column("embedding_id", BIG_ID, nullable=False),
        sa.Column("reference_uri", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["items.id"],
            name=op.f("fk_item_embeddings_item_id_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["embedding_id"],
            ["embeddings.id"],
            name=op.f("fk_item_embeddings_embedding_id_embeddings"),
        ),
        sa.PrimaryKeyConstraint(
            "item_id", "adapter_index", "reference_index", name=op.f("pk_item_embeddings")
        ),
    )
    op.create_index(op.f("ix_item_embeddings_embedding_id"), "item_embeddings", ["embedding_id"])
    op.create_table(
        "outputs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("image_index", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("clip_i", sa.Float(), nullable=True),
        sa.Column("clip_t", sa.Float(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_outputs_item_id_items"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outputs")),
        sa.UniqueConstraint("item_id", "image_index", name=op.f("uq_outputs_item_id")),
    )
    op.execute(JOB_PROGRESS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_progress")
    op.drop_table("outputs")
    op.drop_index(op.f("ix_item_embeddings_embedding_id"), table_name="item_embeddings")
    op.drop_table("item_embeddings")
    op.drop_table("embeddings")
    op.drop_index(op.f("ix_item_events_item_id"), table_name="item_events")
    op.drop_table("item_events")
    op.drop_index("ix_items_job_id_status", table_name="items")
    op.drop_table("items")
    op.drop_table("jobs")
    # PostgreSQL keeps ENUM types after drop_table: drop them too
    bind = op.get_bind()
    sa.Enum(name="item_status").drop(bind, checkfirst=True)
    sa.Enum(name="job_status").drop(bind, checkfirst=True)
