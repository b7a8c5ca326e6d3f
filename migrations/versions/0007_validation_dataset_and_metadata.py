"""A job's validation dataset (loss computed during training) and its client metadata (OpenAI's `metadata`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 03:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("validation_dataset_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_validation_dataset_id_datasets", "datasets", ["validation_dataset_id"], ["id"]
        )
        batch.create_index("ix_jobs_validation_dataset_id", ["validation_dataset_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_validation_dataset_id")
        batch.drop_constraint("fk_jobs_validation_dataset_id_datasets", type_="foreignkey")
        batch.drop_column("metadata")
        batch.drop_column("validation_dataset_id")
