"""Adapter lifecycle in the API: deletion is a SQL flag first, then a best-effort unload in serving."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.services.serving_client import ServingClient
from core.errors import NotFound
from core.models import Adapter
from core.repository import adapters as adapters_repo

log = logging.getLogger(__name__)


def _mark_deleted(session: Session, tenant_id: str, name: str) -> Adapter:
    adapter = adapters_repo.mark_adapter_deleted(session, tenant_id, name)
    if adapter is None:
        raise NotFound(f"no adapter named {name!r}", param="name")
    session.commit()  # deleted in SQL before serving hears of it: the API refuses it from here on
    return adapter


async def delete_adapter(session: Session, serving: ServingClient, tenant_id: str, name: str) -> Adapter:
    adapter = await run_in_threadpool(_mark_deleted, session, tenant_id, name)
    if not await serving.unload(name):
        # Serving refuses deleted names when it next looks them up in SQL; a loaded copy is unreachable
        # because the API checks SQL before every request.
        log.warning("could not tell serving to unload deleted adapter %s", name)
    return adapter
