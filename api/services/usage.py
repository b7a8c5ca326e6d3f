"""Per-tenant quotas: active work of every kind (429 with Retry-After), adapters kept and bytes stored (413).

Admission is race-free the way job admission always was: the new row is inserted first, then the admission
lock is taken (a Postgres advisory lock; SQLite already holds its one write lock), then the tenant's use is
counted with the new row in it. Over a limit, the error propagates and the request's rollback leaves nothing.
Every refusal names its setting in the message (TUNESERVE_...) and in `param`.

Storage is bytes stored plus bytes reserved: each queued or running job, derive and merge reserves an estimate of
what it will write (core/reservations.py; a running job's checkpoints already on disk are taken off its
reservation), so the merge or job whose reservation would take the tenant past its quota is refused at admission,
not after it filled the disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session

from api.schemas import AdapterQuotaOut, QuotaOut, StorageUsageOut, UsageOut
from core import reservations
from core.errors import PayloadTooLarge, RateLimited
from core.repository import jobs as jobs_repo
from core.repository import usage as usage_repo
from core.settings import Settings
from core.storage import Store

# What a request is about to add: its kind decides which limits apply.
Kind = Literal["job", "evaluation", "derive", "merge", "import", "dataset"]
MAKES_ADAPTER: frozenset[Kind] = frozenset({"job", "derive", "merge", "import"})
ADDS_BYTES: frozenset[Kind] = frozenset({"dataset", "import"})  # bytes known at submission: "would it pass?"
# Bytes estimated, reserved at admission (an evaluation's are its samples' rows).
WRITES_LATER: frozenset[Kind] = frozenset({"job", "derive", "merge", "evaluation"})
ACTIVE_LIMITS: dict[Kind, tuple[str, str]] = {
    "job": ("max_active_jobs", "jobs"),
    "evaluation": ("max_active_evaluations", "evaluations"),
    "derive": ("max_active_adapter_operations", "adapter operations (derive, merge, import canaries)"),
    "merge": ("max_active_adapter_operations", "adapter operations (derive, merge, import canaries)"),
    "import": ("max_active_adapter_operations", "adapter operations (derive, merge, import canaries)"),
}


def env_name(setting: str) -> str:
    return f"TUNESERVE_{setting.upper()}"


@dataclass(frozen=True)
class Usage:
    active_jobs: int
    active_evaluations: int
    active_adapter_operations: int
    adapters: int
    pending_adapters: int
    dataset_bytes: int
    adapter_bytes: int
    merged_bytes: int
    checkpoint_bytes: int
    sample_bytes: int = 0
    reserved_bytes: int = 0

    @property
    def storage_bytes(self) -> int:
        return self.dataset_bytes + self.adapter_bytes + self.merged_bytes + self.checkpoint_bytes + self.sample_bytes

    @property
    def committed_bytes(self) -> int:
        """Stored plus reserved by queued and running work: what the quota is checked against."""
        return self.storage_bytes + self.reserved_bytes

    def active(self, kind: Kind) -> int:
        if kind == "job":
            return self.active_jobs
        if kind == "evaluation":
            return self.active_evaluations
        return self.active_adapter_operations


def dir_bytes(path: Path) -> int:
    """Bytes of the files under path (links not followed; files removed meanwhile are skipped)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def checkpoint_bytes(session: Session, settings: Settings, tenant_id: str) -> int:
    """Bytes on disk under store/jobs/<job id> of the tenant's jobs (checkpoints of running and past jobs)."""
    jobs_root = Store(settings).root / "jobs"
    try:
        entries = [e.name for e in os.scandir(jobs_root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    return sum(dir_bytes(jobs_root / job_id) for job_id in usage_repo.owned_job_ids(session, tenant_id, entries))


def evaluation_sample_bytes(session: Session, settings: Settings, tenant_id: str) -> tuple[int, int]:
    """(stored, still to come): the estimated bytes of the tenant's evaluation samples (core.reservations), those
    written (done_examples: one sample per example and scale) and those its active evaluations will write."""
    cap, stored, coming = settings.max_evaluation_examples, 0, 0
    for row in usage_repo.evaluation_sample_rows(session, tenant_id):
        status, done, n, max_examples, split, scales, new_tokens, data_bytes, train_rows, test_rows = row
        per_sample = reservations.sample_bytes(
            dataset_bytes=int(data_bytes or 0),
            dataset_rows=int(train_rows or 0) + int(test_rows or 0),
            max_new_tokens=int(new_tokens),
            max_sample_chars=settings.max_sample_chars,
        )
        stored += int(done or 0) * per_sample
        if status in usage_repo.ACTIVE_WORK:
            examples = n if n is not None else min(max_examples or cap, test_rows if split == "test" else train_rows)
            coming += max(0, min(int(examples or 0), cap) * max(1, len(scales or [])) - int(done or 0)) * per_sample
    return stored, coming


def reserved_bytes(session: Session, settings: Settings, tenant_id: str, *, samples_to_come: int = 0) -> int:
    """What the tenant's queued and running jobs, derives, merges (and evaluations: samples_to_come) are estimated
    to write still."""
    jobs_root = Store(settings).root / "jobs"
    total = samples_to_come
    for job_id, method, hyperparameters in usage_repo.reserving_jobs(session, tenant_id):
        estimate = reservations.job_bytes(settings.base_model, method, hyperparameters)
        total += max(0, estimate - dir_bytes(jobs_root / job_id))
    for kind, source_bytes in usage_repo.reserving_operations(session, tenant_id):
        merge = kind == "merge"
        total += reservations.merge_bytes(settings.base_model) if merge else reservations.derive_bytes(source_bytes)
    return total


def tenant_usage(session: Session, settings: Settings, tenant_id: str, *, checkpoints: int | None = None) -> Usage:
    adapters, merged = usage_repo.adapter_bytes(session, tenant_id)
    samples, samples_to_come = evaluation_sample_bytes(session, settings, tenant_id)
    return Usage(
        active_jobs=usage_repo.active_jobs(session, tenant_id),
        active_evaluations=usage_repo.active_evaluations(session, tenant_id),
        active_adapter_operations=usage_repo.active_operations(session, tenant_id),
        adapters=usage_repo.kept_adapters(session, tenant_id),
        pending_adapters=usage_repo.pending_adapters(session, tenant_id),
        dataset_bytes=usage_repo.dataset_bytes(session, tenant_id),
        adapter_bytes=adapters,
        merged_bytes=merged,
        checkpoint_bytes=checkpoint_bytes(session, settings, tenant_id) if checkpoints is None else checkpoints,
        sample_bytes=samples,
        reserved_bytes=reserved_bytes(session, settings, tenant_id, samples_to_come=samples_to_come),
    )


def usage_out(settings: Settings, usage: Usage) -> UsageOut:
    def quota(used: int, setting: str) -> QuotaOut:
        return QuotaOut(used=used, limit=getattr(settings, setting), setting=env_name(setting))

    return UsageOut(
        active_jobs=quota(usage.active_jobs, "max_active_jobs"),
        active_evaluations=quota(usage.active_evaluations, "max_active_evaluations"),
        active_adapter_operations=quota(usage.active_adapter_operations, "max_active_adapter_operations"),
        adapters=AdapterQuotaOut(
            used=usage.adapters,
            pending=usage.pending_adapters,
            limit=settings.max_adapters_per_tenant,
            setting=env_name("max_adapters_per_tenant"),
        ),
        storage_bytes=StorageUsageOut(
            used=usage.storage_bytes,
            limit=settings.max_storage_bytes_per_tenant,
            setting=env_name("max_storage_bytes_per_tenant"),
            datasets=usage.dataset_bytes,
            adapters=usage.adapter_bytes,
            merged_models=usage.merged_bytes,
            checkpoints=usage.checkpoint_bytes,
            evaluation_samples=usage.sample_bytes,
            reserved=usage.reserved_bytes,
        ),
    )


def get_usage(session: Session, settings: Settings, tenant_id: str) -> UsageOut:
    return usage_out(settings, tenant_usage(session, settings, tenant_id))


def _check(settings: Settings, usage: Usage, kind: Kind, *, new_bytes: int, inserted: bool) -> None:
    """Refuse `kind` if it passes a limit. inserted: the new row is already in `usage` (else it is added here)."""
    extra = 0 if inserted else 1
    limit = settings.max_storage_bytes_per_tenant
    quota = env_name("max_storage_bytes_per_tenant")
    if kind in ADDS_BYTES:
        total = usage.committed_bytes + (0 if inserted else new_bytes)
        if total > limit:
            raise PayloadTooLarge(
                f"this {kind} of {new_bytes} bytes would bring your storage to {total} bytes (stored, plus "
                f"{usage.reserved_bytes} reserved by queued and running work), past your quota of {limit} bytes "
                f"({quota}); delete adapters or datasets first",
                param="max_storage_bytes_per_tenant",
                code="storage_quota_exceeded",
            )
    elif kind in WRITES_LATER and (usage.committed_bytes > limit or usage.committed_bytes >= limit and not inserted):
        raise PayloadTooLarge(
            f"your storage is {usage.storage_bytes} bytes and queued and running work"
            f"{' (this ' + kind + ' included)' if inserted else ''} reserves {usage.reserved_bytes} bytes more (an "
            f"estimate of what it writes), {usage.committed_bytes} bytes in all, past your quota of {limit} bytes "
            f"({quota}); delete adapters or wait for work to finish",
            param="max_storage_bytes_per_tenant",
            code="storage_quota_exceeded",
        )
    if kind in MAKES_ADAPTER:
        # An import's adapter row is inserted with it; a job, derive or merge counts as pending.
        held = usage.adapters + usage.pending_adapters + extra
        if held > settings.max_adapters_per_tenant:
            raise PayloadTooLarge(
                f"you keep {held - 1} adapters (queued or running work that makes one counts) and the limit is "
                f"{settings.max_adapters_per_tenant} ({env_name('max_adapters_per_tenant')}); delete one first",
                param="max_adapters_per_tenant",
                code="adapter_quota_exceeded",
            )
    if kind in ACTIVE_LIMITS:
        setting, what = ACTIVE_LIMITS[kind]
        active, cap = usage.active(kind) + extra, getattr(settings, setting)
        if active > cap:
            raise RateLimited(
                f"{active - 1} of your {what} are queued or running and the limit is {cap} ({env_name(setting)}); "
                "retry when one finishes",
                param=setting,
                retry_after=settings.active_jobs_retry_after_seconds,
            )


def check_room(session: Session, settings: Settings, tenant_id: str, kind: Kind, *, new_bytes: int = 0) -> None:
    """A first check before expensive work (reading an upload): refuses early, without the lock. admit() decides."""
    _check(settings, tenant_usage(session, settings, tenant_id), kind, new_bytes=new_bytes, inserted=False)


def admit(session: Session, settings: Settings, tenant_id: str, kind: Kind, *, new_bytes: int = 0) -> None:
    """Refuse the row just inserted (the caller's transaction) if the tenant is now past a limit.

    Bytes on disk are summed before the lock (no admission changes them); the SQL counts after it.
    """
    checkpoints = checkpoint_bytes(session, settings, tenant_id)
    jobs_repo.lock_admission(session)
    usage = tenant_usage(session, settings, tenant_id, checkpoints=checkpoints)
    _check(settings, usage, kind, new_bytes=new_bytes, inserted=True)
