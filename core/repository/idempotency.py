"""SQL for Idempotency-Key records."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import IdempotencyKey


def get_key(session: Session, *, endpoint: str, key: str) -> IdempotencyKey | None:
    return session.scalar(select(IdempotencyKey).where(IdempotencyKey.endpoint == endpoint, IdempotencyKey.key == key))


def add_key(session: Session, record: IdempotencyKey) -> None:
    """Insert and flush, so a concurrent duplicate raises IntegrityError here (unique endpoint, key)."""
    session.add(record)
    session.flush()
