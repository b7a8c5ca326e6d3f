"""Derive a scaled adapter or merge one into a full model: validate, commit the operation, send it to a worker."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services import usage as usage_service
from core.adapter_ops import SCALABLE_METHODS
from core.errors import Conflict, InvalidInput, NotFound
from core.models import AdapterOperation, AdapterStatus, OperationKind, WorkStatus
from core.queue import commit_and_send
from core.repository import adapter_operations as operations_repo
from core.repository import adapters as adapters_repo
from core.repository import leases
from core.settings import Settings


def create_operation(
    session: Session, settings: Settings, tenant_id: str, *, name: str, kind: OperationKind, scale: float
) -> AdapterOperation:
    adapter = adapters_repo.get_owned_adapter(session, tenant_id, name)
    if adapter is None or adapter.status == AdapterStatus.deleted:
        raise NotFound(f"no adapter named {name!r}", param="name")
    if adapter.method not in SCALABLE_METHODS:
        raise InvalidInput(
            f"derive and merge apply to LoRA and QLoRA adapters; {name!r} is {adapter.method!r}", param="name"
        )
    if adapter.status != AdapterStatus.ready:
        raise InvalidInput(f"adapter {name!r} is {adapter.status.value}", param="name")
    operation = operations_repo.add_operation(
        session,
        AdapterOperation(
            tenant_id=tenant_id,
            kind=kind,
            source_adapter=name,
            scale=scale,
            status=WorkStatus.queued,
            max_attempts=settings.max_attempts,
        ),
    )
    usage_service.admit(session, settings, tenant_id, "derive" if kind == OperationKind.derive else "merge")
    commit_and_send(session, settings, AdapterOperation, operation.id)
    return operation


def get_operation_or_404(session: Session, tenant_id: str, operation_id: str) -> AdapterOperation:
    operation = operations_repo.get_owned_operation(session, tenant_id, operation_id)
    if operation is None:
        raise NotFound(f"no adapter operation with id {operation_id!r}", param="operation_id")
    return operation


def cancel_operation(session: Session, tenant_id: str, operation_id: str) -> AdapterOperation:
    """A queued operation is cancelled at once; a running one is flagged for its worker (409 once it ended).

    A cancelled canary leaves its imported adapter unhealthy (never served): at once here when it was queued,
    by the reconciler (adapters_repo.settle_failed_canaries) when its worker stops it.
    """
    operation = get_operation_or_404(session, tenant_id, operation_id)
    if operation.status.is_terminal:
        raise Conflict(
            f"adapter operation {operation_id} is already {operation.status.value}",
            param="operation_id",
            code="operation_finished",
        )
    leases.request_cancel(session, AdapterOperation, operation_id)
    operation = get_operation_or_404(session, tenant_id, operation_id)
    if operation.kind == OperationKind.canary and operation.status == WorkStatus.cancelled:
        adapters_repo.set_health(
            session,
            operation.source_adapter,
            healthy=False,
            reason="canary cancelled before it ran: the adapter was never checked",
        )
    return operation
