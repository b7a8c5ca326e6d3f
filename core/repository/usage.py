"""SQL behind the per-tenant quotas: active work of every kind, adapters kept, bytes stored.

Counted inside the admitting transaction, after the new row is inserted and under the admission lock
(core.repository.jobs.lock_admission), so concurrent submissions cannot all slip past a limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from core.models import Adapter, AdapterOperation, AdapterStatus, Dataset, Evaluation, Job, WorkStatus
from core.repository.jobs import ACTIVE as ACTIVE_JOB_STATUSES

ACTIVE_WORK = (WorkStatus.queued, WorkStatus.running)
# Adapter operations whose success registers a new adapter row (a canary only judges an imported one).
PRODUCING_OPERATIONS = ("derive", "merge")
MERGED_METHOD = "merged"


def _count(session: Session, query: Select[Any]) -> int:
    return int(session.scalar(query) or 0)


def active_jobs(session: Session, tenant_id: str) -> int:
    """Jobs validating files, queued or running."""
    return _count(
        session,
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATUSES)),
    )


def active_evaluations(session: Session, tenant_id: str) -> int:
    """Evaluations queued or running, a job's before/after ones included."""
    return _count(
        session,
        select(func.count())
        .select_from(Evaluation)
        .where(Evaluation.tenant_id == tenant_id, Evaluation.status.in_(ACTIVE_WORK)),
    )


def active_operations(session: Session, tenant_id: str, kinds: Iterable[str] | None = None) -> int:
    """Adapter operations queued or running (derive, merge and import canaries; or only `kinds`)."""
    query = (
        select(func.count())
        .select_from(AdapterOperation)
        .where(AdapterOperation.tenant_id == tenant_id, AdapterOperation.status.in_(ACTIVE_WORK))
    )
    if kinds is not None:
        query = query.where(AdapterOperation.kind.in_(list(kinds)))
    return _count(session, query)


def kept_adapters(session: Session, tenant_id: str) -> int:
    """Adapters and merged models not deleted (validating and unhealthy ones are on disk too)."""
    return _count(
        session,
        select(func.count())
        .select_from(Adapter)
        .where(Adapter.tenant_id == tenant_id, Adapter.status != AdapterStatus.deleted),
    )


def pending_adapters(session: Session, tenant_id: str) -> int:
    """Work that registers an adapter when it succeeds: active jobs, and active derives and merges."""
    return active_jobs(session, tenant_id) + active_operations(session, tenant_id, PRODUCING_OPERATIONS)


def dataset_bytes(session: Session, tenant_id: str) -> int:
    return _count(session, select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.tenant_id == tenant_id))


def adapter_bytes(session: Session, tenant_id: str) -> tuple[int, int]:
    """(adapters, merged models): the recorded size_bytes of the tenant's rows that are not deleted."""
    rows = session.execute(
        select(Adapter.method, func.coalesce(func.sum(Adapter.size_bytes), 0))
        .where(Adapter.tenant_id == tenant_id, Adapter.status != AdapterStatus.deleted)
        .group_by(Adapter.method)
    ).all()
    merged = sum(int(total) for method, total in rows if method == MERGED_METHOD)
    return sum(int(total) for method, total in rows if method != MERGED_METHOD), merged


def owned_job_ids(session: Session, tenant_id: str, candidates: Iterable[str]) -> list[str]:
    """Which of these job ids (directories found under store/jobs) are the tenant's."""
    candidates = list(candidates)
    owned: list[str] = []
    for start in range(0, len(candidates), 500):  # bounded IN lists
        chunk = candidates[start : start + 500]
        owned += session.scalars(select(Job.id).where(Job.tenant_id == tenant_id, Job.id.in_(chunk)))
    return owned


def reserving_jobs(session: Session, tenant_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, method, hyperparameters) of the tenant's active jobs: each reserves what it will write."""
    rows = session.execute(
        select(Job.id, Job.method, Job.hyperparameters).where(
            Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATUSES)
        )
    ).all()
    return [(job_id, str(getattr(method, "value", method)), dict(hp or {})) for job_id, method, hp in rows]


def reserving_operations(session: Session, tenant_id: str) -> list[tuple[str, int]]:
    """(kind, the source adapter's bytes) of the tenant's active derives and merges."""
    rows = session.execute(
        select(AdapterOperation.kind, func.coalesce(Adapter.size_bytes, 0))
        .outerjoin(Adapter, Adapter.name == AdapterOperation.source_adapter)
        .where(
            AdapterOperation.tenant_id == tenant_id,
            AdapterOperation.status.in_(ACTIVE_WORK),
            AdapterOperation.kind.in_(list(PRODUCING_OPERATIONS)),
        )
    ).all()
    return [(str(getattr(kind, "value", kind)), int(size)) for kind, size in rows]


def evaluation_sample_rows(session: Session, tenant_id: str) -> list[Any]:
    """Each of the tenant's evaluations with what sizes its samples: (status, done_examples, n_examples,
    max_examples, split, scales, max_new_tokens, and its dataset's bytes, train_rows, test_rows)."""
    return list(
        session.execute(
            select(
                Evaluation.status,
                Evaluation.done_examples,
                Evaluation.n_examples,
                Evaluation.max_examples,
                Evaluation.split,
                Evaluation.scales,
                Evaluation.max_new_tokens,
                Dataset.bytes,
                Dataset.train_rows,
                Dataset.test_rows,
            )
            .join(Dataset, Dataset.id == Evaluation.dataset_id)
            .where(Evaluation.tenant_id == tenant_id)
        ).all()
    )
