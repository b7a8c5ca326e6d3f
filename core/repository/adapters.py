"""SQL for adapters."""

from __future__ import annotations

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from core.models import Adapter, AdapterOperation, AdapterStatus, WorkStatus
from core.repository import newest_first_page


def get_adapter_by_name(session: Session, name: str) -> Adapter | None:
    """Any tenant's adapter (names are unique across tenants): for serving and workers."""
    return session.scalar(select(Adapter).where(Adapter.name == name))


def get_owned_adapter(session: Session, tenant_id: str, name: str) -> Adapter | None:
    """The tenant's adapter named `name`, deleted or not."""
    return session.scalar(select(Adapter).where(Adapter.name == name, Adapter.tenant_id == tenant_id))


def get_adapter_for_job(session: Session, job_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.job_id == job_id))


def list_adapters(session: Session, tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Adapter], bool]:
    query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.status != AdapterStatus.deleted)
    return newest_first_page(session, Adapter, query, limit=limit, after=after)


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
    """Imported adapters whose canary failed for good (an error, or no attempts left): unhealthy, with the reason.

    Without this an adapter whose canary never ran would stay `validating` forever: never served, never settled.
    """
    query = (
        select(Adapter, AdapterOperation)
        .join(AdapterOperation, and_(AdapterOperation.source_adapter == Adapter.name, AdapterOperation.kind == "canary"))
        .where(Adapter.status == AdapterStatus.validating, AdapterOperation.status == WorkStatus.failed)
    )
    settled = []
    for adapter, operation in session.execute(query).all():
        adapter.status, adapter.servable = AdapterStatus.unhealthy, False
        adapter.servable_reason = f"canary could not run: {operation.error_message or operation.error_code}"
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
