"""Preference and reward objectives: a job's objective, init_adapter and grader; what a dataset can feed; the
trainer's per-step metrics on events; an evaluation's grader.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 16:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Every job before this migration was supervised.
        batch.add_column(sa.Column("objective", sa.String(16), nullable=False, server_default="sft"))
        batch.add_column(sa.Column("init_adapter", sa.String(128), nullable=True))
        batch.add_column(sa.Column("grader", sa.JSON(), nullable=True))
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("objectives", sa.JSON(), nullable=True))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=True))
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("grader", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("grader")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("metrics")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("objectives")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("grader")
        batch.drop_column("init_adapter")
        batch.drop_column("objective")
