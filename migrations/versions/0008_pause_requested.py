"""Jobs can be paused: a pause_requested flag (the `paused` status needs no change, statuses are plain strings).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 03:05:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    # A paused job cannot be represented before this revision: it waits in the queue again.
    op.execute("UPDATE jobs SET status = 'queued' WHERE status = 'paused'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pause_requested")
