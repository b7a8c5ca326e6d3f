"""Freeing the disk of deleted adapters.

DELETE /adapters/{name} deletes the files at once unless queued or running work (an evaluation, a derive, a
merge, a canary) names the adapter; then they stay until that work ended, and purge_deleted_adapter_files
(run by the reconciler) deletes them. A worker checks an adapter's status before it reads its files, so
deleting the files of a deleted adapter never pulls them from under work that may still use them.
"""

from __future__ import annotations

import logging

from core.db import session_scope
from core.models import Adapter
from core.repository import adapters as adapters_repo
from core.settings import Settings
from core.storage import Store

log = logging.getLogger("tuneserve.cleanup")


def delete_adapter_files(settings: Settings, adapter: Adapter) -> bool:
    """Remove the adapter's directory (inside the store); False when there was none."""
    return Store(settings).remove(adapter.path)


def purge_deleted_adapter_files(settings: Settings) -> list[str]:
    """Delete the files of adapters in status `deleted` that no queued or running evaluation or adapter
    operation names; returns the names whose files were deleted (those already gone are not listed)."""
    with session_scope(settings.database_url) as s:
        candidates = adapters_repo.deleted_not_in_use(s)
    purged = []
    for adapter in candidates:
        try:
            if delete_adapter_files(settings, adapter):
                purged.append(adapter.name)
        except (OSError, ValueError):  # a path outside the store, or a filesystem error: keep going
            log.warning("could not delete the files of deleted adapter %s", adapter.name, exc_info=True)
    if purged:
        log.info("deleted the files of %d deleted adapter(s): %s", len(purged), ", ".join(purged))
    return purged
