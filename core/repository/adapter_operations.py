"""SQL for adapter operations (derive, merge); the lease functions are in core.repository.leases."""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.models import AdapterOperation
from core.repository import get_owned


def add_operation(session: Session, operation: AdapterOperation) -> AdapterOperation:
    session.add(operation)
    session.flush()
    return operation


def get_owned_operation(session: Session, tenant_id: str, operation_id: str) -> AdapterOperation | None:
    return get_owned(session, AdapterOperation, tenant_id, operation_id)
