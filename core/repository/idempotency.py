"""SQL for Idempotency-Key records."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import IdempotencyKey


def get_key(session: Session, *, tenant_id: str, endpoint: str, key: str) -> IdempotencyKey | None:
    query = select(IdempotencyKey).where(
        IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.endpoint == endpoint, IdempotencyKey.key == key
    )
    return session.scalar(query)


def delete_key(session: Session, record: IdempotencyKey) -> None:
    session.delete(record)
    session.flush()


def add_key(session: Session, record: IdempotencyKey) -> None:
    """Insert and flush, so a concurrent duplicate raises IntegrityError here (unique tenant, endpoint, key)."""
    session.add(record)
    session.flush()
