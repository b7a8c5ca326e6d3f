"""Adapter lifecycle in the API: deletion is a SQL flag first, then a best-effort unload in serving, then the
files go, unless queued or running work still names the adapter (core.cleanup deletes them once it ended)."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.services.serving_client import ServingClient
from core.cleanup import delete_adapter_files
from core.errors import NotFound
from core.models import Adapter, AdapterStatus
from core.repository import adapters as adapters_repo
from core.settings import Settings

log = logging.getLogger(__name__)


def live_adapter_or_404(session: Session, tenant_id: str, name: str, *, param: str = "name") -> Adapter:
    """The tenant's adapter named `name`, unless it was deleted; else the 404 naming `param`, the field that named it."""
    adapter = adapters_repo.get_owned_adapter(session, tenant_id, name)
    if adapter is None or adapter.status == AdapterStatus.deleted:
        raise NotFound(f"no adapter named {name!r}", param=param)
    return adapter


def _mark_deleted(session: Session, tenant_id: str, name: str) -> Adapter:
    adapter = adapters_repo.mark_adapter_deleted(session, tenant_id, name)
    if adapter is None:
        raise NotFound(f"no adapter named {name!r}", param="name")
    session.commit()  # deleted in SQL before serving hears of it: the API refuses it from here on
    return adapter


async def delete_adapter(
    session: Session, settings: Settings, serving: ServingClient, tenant_id: str, name: str
) -> tuple[Adapter, bool]:
    """The adapter, and whether its files were deleted now (else the reconciler's sweep deletes them later)."""
    adapter = await run_in_threadpool(_mark_deleted, session, tenant_id, name)
    if not await serving.unload(name):
        # Serving refuses deleted names when it next looks them up in SQL; a loaded copy is unreachable
        # because the API checks SQL before every request.
        log.warning("could not tell serving to unload deleted adapter %s", name)
    freed = await run_in_threadpool(_free_files, session, settings, adapter)
    return adapter, freed


def _free_files(session: Session, settings: Settings, adapter: Adapter) -> bool:
    """Delete the deleted adapter's directory now, unless a queued or running evaluation or operation names it.

    Work queued from here on cannot name it (the API refuses deleted adapters) and a worker checks the
    adapter's status before it reads its files.
    """
    if adapters_repo.in_use(session, adapter.name):
        return False
    delete_adapter_files(settings, adapter)
    return True
