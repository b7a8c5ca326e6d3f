"""SQL for adapter operations (derive, merge); the lease functions are in core.repository.leases."""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.models import AdapterOperation


def add_operation(session: Session, operation: AdapterOperation) -> AdapterOperation:
    session.add(operation)
    session.flush()
    return operation


def get_operation(session: Session, operation_id: str) -> AdapterOperation | None:
    return session.get(AdapterOperation, operation_id)
