"""Job submission and control: validate, commit the row, and only then send its id to the workers."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services import idempotency as idempotency_service
from api.services import usage as usage_service
from api.services.datasets import get_dataset_or_404
from core.errors import Conflict, InvalidInput, NotFound
from core.jobspec import JobSpec
from core.model_info import check_target_modules
from core.models import Job, JobEvent, JobStatus, TrainingMethod, new_id
from core.queue import commit_and_send
from core.repository import jobs as jobs_repo
from core.repository import leases
from core.settings import Settings


def resolve_base_model(settings: Settings, requested: str | None) -> str:
    """One base model per deployment (serving batches adapters over it); accept its path or served name."""
    if requested is None or requested in (settings.base_model, settings.served_model_name):
        return settings.served_model_name
    raise InvalidInput(
        f"base_model {requested!r} is not served here; use {settings.served_model_name!r}", param="base_model"
    )


def create_job(
    session: Session, settings: Settings, tenant_id: str, spec: JobSpec, *, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Validate, commit the job, send it; returns the job and whether an earlier request (same Idempotency-Key) made it."""
    # The parsed body, so key order, whitespace and spelled-out defaults do not make another request.
    idempotency = idempotency_service.idempotent_request(
        tenant_id,
        "POST /jobs",
        idempotency_key,
        spec.model_dump(mode="json"),
        ttl_seconds=settings.idempotency_key_ttl_seconds,
    )
    if idempotency is not None and (earlier := idempotency_service.earlier_resource(session, idempotency)):
        return get_job_or_404(session, tenant_id, earlier), True
    hp = spec.hyperparameters
    hp.check_limits(settings, spec.method)
    if isinstance(hp.target_modules, list):
        check_target_modules(settings.base_model, hp.target_modules)
    base_model = resolve_base_model(settings, spec.base_model)
    dataset = get_dataset_or_404(session, tenant_id, spec.dataset_id)
    hp.check_steps(settings, dataset.train_rows)
    job_id = new_id("ftjob")
    if idempotency is not None and (winner := idempotency_service.claim_key(session, idempotency, job_id)):
        return get_job_or_404(session, tenant_id, winner), True
    job = jobs_repo.add_job(
        session,
        Job(
            id=job_id,
            tenant_id=tenant_id,
            base_model=base_model,
            dataset_id=spec.dataset_id,
            method=TrainingMethod(spec.method),
            hyperparameters=spec.hyperparameters.model_dump(mode="json"),
            suffix=spec.suffix,
            evaluation=spec.evaluation.model_dump(mode="json"),
            status=JobStatus.queued,
            max_attempts=settings.max_attempts,
        ),
    )
    admit_job(session, settings, tenant_id)
    jobs_repo.add_event(session, JobEvent(job_id=job.id, kind="status", message="job queued"))
    commit_and_send(session, settings, Job, job.id)
    return job, False


def admit_job(session: Session, settings: Settings, tenant_id: str) -> None:
    """Refuse the job just inserted (the rollback leaves nothing): 429 past max_active_jobs, 413 at the storage
    quota or past max_adapters_per_tenant.

    Counted after the insert and under the admission lock, so concurrent submissions cannot all slip in.
    """
    usage_service.admit(session, settings, tenant_id, "job")


def get_job_or_404(session: Session, tenant_id: str, job_id: str) -> Job:
    job = jobs_repo.get_owned_job(session, tenant_id, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}", param="job_id")
    return job


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_job_or_404(session, tenant_id, job_id)
    if job.status.is_terminal:
        raise Conflict(f"job {job_id} is already {job.status.value}", param="job_id", code="job_finished")
    leases.request_cancel(session, Job, job_id)
    jobs_repo.add_event(session, JobEvent(job_id=job_id, kind="status", message="cancel requested"))
    return get_job_or_404(session, tenant_id, job_id)
