"""Every kind of leased work (jobs, evaluations, adapter operations) can be cancelled and records its dispatches.

cancel_requested on evaluations and adapter_operations (jobs have it); dispatch_count and dispatched_at on all
three, so the reconciler re-sends a record only with exponential backoff (duplicates stay bounded).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 13:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LEASED_TABLES = ("jobs", "evaluations", "adapter_operations")


def upgrade() -> None:
    for table in ("evaluations", "adapter_operations"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
    for table in LEASED_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("dispatch_count", sa.Integer(), nullable=False, server_default="0"))
            batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in LEASED_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("dispatched_at")
            batch.drop_column("dispatch_count")
    for table in ("evaluations", "adapter_operations"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("cancel_requested")
