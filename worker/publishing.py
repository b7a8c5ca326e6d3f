"""Publishing an adapter directory: only by the lease holder, and never over a registered adapter's files."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from core.repository import adapters as adapters_repo
from core.repository import leases
from core.repository.leases import Leased
from core.storage import Store


class LeaseLost(Exception):
    """Another attempt owns the record now: this one must write nothing more."""


def publish_under_lease(
    session: Session, store: Store, model: Leased, record_id: str, owner: str, staged: Path, adapter_name: str
) -> str:
    """Move a fully written staging dir to the adapter's place, holding the record's lease; its relative path.

    The caller registers the adapter in the same transaction. The lease row stays locked until that commit, so
    an attempt that lost its lease (a lagging one, say, whose heartbeat failed) cannot publish at the same time,
    and a registered adapter's directory is never replaced (invariant 4). An existing directory with no row is
    the leftover of an attempt that crashed between publish and commit: it is replaced.
    """
    if not leases.lock_owned(session, model, record_id, owner=owner):
        raise LeaseLost(record_id)
    if adapters_repo.get_adapter_by_name(session, adapter_name) is not None:
        raise LeaseLost(f"{record_id}: adapter {adapter_name} is already registered")
    relative = store.adapter_dir(adapter_name)
    store.publish(staged, relative, replace_unregistered=True)
    return relative
