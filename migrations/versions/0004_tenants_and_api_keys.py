"""tenants and api_keys; every dataset, job, adapter, evaluation, adapter operation and idempotency key
gets a tenant_id. Rows that existed before belong to the default tenant (the one auth-off deployments use).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 12:15:00
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DEFAULT_TENANT_ID = "tn-default"
OWNED_TABLES = ("datasets", "jobs", "adapters", "evaluations", "adapter_operations")


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.bulk_insert(tenants, [{"id": DEFAULT_TENANT_ID, "name": "default", "created_at": datetime.now(UTC)}])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_api_keys_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_sha256", name=op.f("uq_api_keys_key_sha256")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant_id"), ["tenant_id"], unique=False)

    for table in OWNED_TABLES:
        # The server default fills existing rows; it is dropped right after, so new rows must name a tenant.
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("tenant_id", sa.String(length=40), nullable=False, server_default=DEFAULT_TENANT_ID)
            )
            batch_op.create_index(batch_op.f(f"ix_{table}_tenant_id"), ["tenant_id"], unique=False)
            batch_op.create_foreign_key(batch_op.f(f"fk_{table}_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"])
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("tenant_id", server_default=None)

    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tenant_id", sa.String(length=40), nullable=False, server_default=DEFAULT_TENANT_ID)
        )
        batch_op.drop_constraint("uq_idempotency_keys_endpoint", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_idempotency_keys_tenant_id"), ["tenant_id", "endpoint", "key"])
        batch_op.create_foreign_key(
            batch_op.f("fk_idempotency_keys_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"]
        )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.alter_column("tenant_id", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_constraint("fk_idempotency_keys_tenant_id_tenants", type_="foreignkey")
        batch_op.drop_constraint("uq_idempotency_keys_tenant_id", type_="unique")
        batch_op.create_unique_constraint("uq_idempotency_keys_endpoint", ["endpoint", "key"])
        batch_op.drop_column("tenant_id")
    for table in reversed(OWNED_TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f"fk_{table}_tenant_id_tenants", type_="foreignkey")
            batch_op.drop_index(f"ix_{table}_tenant_id")
            batch_op.drop_column("tenant_id")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant_id"))
    op.drop_table("api_keys")
    op.drop_table("tenants")
