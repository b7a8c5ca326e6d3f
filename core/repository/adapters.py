"""SQL for adapters."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from core.models import (
    Adapter,
    AdapterOperation,
    AdapterStatus,
    Evaluation,
    Job,
    JobStatus,
    OperationKind,
    WorkStatus,
)
from core.repository import newest_first_page


def get_adapter_by_name(session: Session, name: str) -> Adapter | None:
    """Any tenant's adapter (names are unique across tenants): for serving and workers."""
    return session.scalar(select(Adapter).where(Adapter.name == name))


def get_owned_adapter(session: Session, tenant_id: str, name: str) -> Adapter | None:
    """The tenant's adapter named `name`, deleted or not."""
    return session.scalar(select(Adapter).where(Adapter.name == name, Adapter.tenant_id == tenant_id))


def list_adapters(session: Session, tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Adapter], bool]:
    query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.status != AdapterStatus.deleted)
    return newest_first_page(session, Adapter, query, limit=limit, after=after)


def list_checkpoint_adapters(session: Session, tenant_id: str, adapter_name: str, mark: str) -> list[Adapter]:
    """The tenant's adapters named `adapter_name` + `mark` + a step (a job's published checkpoints), not deleted."""
    query = select(Adapter).where(
        Adapter.tenant_id == tenant_id,
        Adapter.status != AdapterStatus.deleted,
        Adapter.name.startswith(adapter_name + mark, autoescape=True),
    )
    return list(session.scalars(query.order_by(Adapter.created_at, Adapter.id)))


def add_adapter(session: Session, adapter: Adapter) -> Adapter:
    session.add(adapter)
    session.flush()
    return adapter


def list_servable_adapters(session: Session, tenant_id: str) -> list[Adapter]:
    """The tenant's ready, servable adapters, oldest first (the OpenAI models list)."""
    query = select(Adapter).where(
        Adapter.tenant_id == tenant_id, Adapter.status == AdapterStatus.ready, Adapter.servable.is_(True)
    )
    return list(session.scalars(query.order_by(Adapter.created_at, Adapter.id)))


def set_health(session: Session, name: str, *, healthy: bool, reason: str | None) -> None:
    """An imported adapter's canary verdict: ready and servable, or unhealthy and never served."""
    session.execute(
        update(Adapter)
        .where(Adapter.name == name, Adapter.status == AdapterStatus.validating)
        .values(
            status=AdapterStatus.ready if healthy else AdapterStatus.unhealthy,
            servable=healthy,
            servable_reason=reason,
        )
        .execution_options(synchronize_session=False)
    )


def settle_failed_canaries(session: Session) -> list[str]:
    """Imported adapters whose canary failed for good (an error, no attempts left, or cancelled): unhealthy, with the reason.

    Without this an adapter whose canary never ran would stay `validating` forever: never served, never settled.
    """
    query = (
        select(Adapter, AdapterOperation)
        .join(
            AdapterOperation,
            and_(AdapterOperation.source_adapter == Adapter.name, AdapterOperation.kind == OperationKind.canary),
        )
        .where(
            Adapter.status == AdapterStatus.validating,
            AdapterOperation.status.in_([WorkStatus.failed, WorkStatus.cancelled]),
        )
    )
    settled = []
    for adapter, operation in session.execute(query).all():
        adapter.status, adapter.servable = AdapterStatus.unhealthy, False
        why = (
            "cancelled" if operation.status == WorkStatus.cancelled else operation.error_message or operation.error_code
        )
        adapter.servable_reason = f"canary could not run: {why}"
        settled.append(adapter.name)
    session.flush()
    return settled


def mark_adapter_deleted(session: Session, tenant_id: str, name: str) -> Adapter | None:
    """Flag the tenant's adapter deleted; its name stays taken forever, so it never returns with other weights."""
    adapter = get_owned_adapter(session, tenant_id, name)
    if adapter is None or adapter.status == AdapterStatus.deleted:
        return None
    adapter.status = AdapterStatus.deleted
    session.flush()
    return adapter


def in_use(session: Session, name: str) -> bool:
    """A queued or running evaluation, adapter operation or job (its init_adapter) names the adapter: its files must
    stay for now."""
    return bool(session.scalar(select(_referenced(name))))


def _referenced(name: Any) -> Any:
    active = [WorkStatus.queued, WorkStatus.running]
    return or_(
        exists().where(Evaluation.adapter_name == name, Evaluation.status.in_(active)),
        exists().where(AdapterOperation.source_adapter == name, AdapterOperation.status.in_(active)),
        exists().where(Job.init_adapter == name, Job.status.in_([JobStatus.queued, JobStatus.running])),
    )


def deleted_not_in_use(session: Session) -> list[Adapter]:
    """Deleted adapters no queued or running work names: their files may go (core.cleanup)."""
    query = select(Adapter).where(Adapter.status == AdapterStatus.deleted, ~_referenced(Adapter.name))
    return list(session.scalars(query.order_by(Adapter.created_at, Adapter.id)))
