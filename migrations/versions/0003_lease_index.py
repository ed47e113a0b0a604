"""An index for the lease reaper: items in a working status whose lease ran out.

Why: `ipbatch reaper` asks "which embedding/running items have an expired lease?" every
minute; without (status, lease_until) that is a scan of every item of every job.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_items_status_lease_until", "items", ["status", "lease_until"])


def downgrade() -> None:
    op.drop_index("ix_items_status_lease_until", table_name="items")
