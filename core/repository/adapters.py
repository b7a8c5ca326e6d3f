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
