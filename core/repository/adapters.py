"""SQL for adapters."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Adapter, AdapterStatus
from core.repository import newest_first_page


def get_adapter_by_name(session: Session, name: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.name == name))


def get_adapter_for_job(session: Session, job_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.job_id == job_id))


def list_adapters(session: Session, *, limit: int, after: str | None) -> tuple[list[Adapter], bool]:
    query = select(Adapter).where(Adapter.status != AdapterStatus.deleted)
    return newest_first_page(session, Adapter, query, limit=limit, after=after)


def add_adapter(session: Session, adapter: Adapter) -> Adapter:
    session.add(adapter)
    session.flush()
    return adapter


def list_servable_adapters(session: Session) -> list[Adapter]:
    """Ready, servable adapters, oldest first (the OpenAI models list)."""
    query = select(Adapter).where(Adapter.status == AdapterStatus.ready, Adapter.servable.is_(True))
    return list(session.scalars(query.order_by(Adapter.created_at, Adapter.id)))


def mark_adapter_deleted(session: Session, name: str) -> Adapter | None:
    """Flag the adapter deleted; its name stays taken forever, so it never returns with other weights."""
    adapter = get_adapter_by_name(session, name)
    if adapter is None or adapter.status == AdapterStatus.deleted:
        return None
    adapter.status = AdapterStatus.deleted
    session.flush()
    return adapter
