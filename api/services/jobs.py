"""Job submission and control: validate, commit the row, and only then send its id to the workers."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from api.services.datasets import get_dataset_or_404
from core.errors import Conflict, InvalidInput, NotFound
from core.jobspec import JobSpec
from core.model_info import check_target_modules
from core.models import Job, JobEvent, JobStatus
from core.queue import send_train
from core.repository import jobs as jobs_repo
from core.settings import Settings

log = logging.getLogger(__name__)


def resolve_base_model(settings: Settings, requested: str | None) -> str:
    """One base model per deployment (serving batches adapters over it); accept its path or served name."""
    if requested is None or requested in (settings.base_model, settings.served_model_name):
        return settings.served_model_name
    raise InvalidInput(
        f"base_model {requested!r} is not served here; use {settings.served_model_name!r}", param="base_model"
    )


def create_job(session: Session, settings: Settings, spec: JobSpec) -> Job:
    hp = spec.hyperparameters
    hp.check_limits(settings, spec.method)
    if isinstance(hp.target_modules, list):
        check_target_modules(settings.base_model, hp.target_modules)
    base_model = resolve_base_model(settings, spec.base_model)
    get_dataset_or_404(session, spec.dataset_id)
    job = jobs_repo.add_job(
        session,
        Job(
            base_model=base_model,
            dataset_id=spec.dataset_id,
            method=spec.method,
            hyperparameters=spec.hyperparameters.model_dump(mode="json"),
            suffix=spec.suffix,
            evaluation=spec.evaluation.model_dump(mode="json"),
            status=JobStatus.queued,
            max_attempts=settings.max_attempts,
        ),
    )
    jobs_repo.add_event(session, JobEvent(job_id=job.id, kind="status", message="job queued"))
    session.commit()  # the row exists before any worker can hear of it
    dispatch(settings, job.id)
    return job


def dispatch(settings: Settings, job_id: str) -> bool:
    """Send the job id; a broker failure leaves the committed job queued for the reconciler."""
    try:
        send_train(settings, job_id)
        return True
    except Exception:  # noqa: BLE001 - any broker error means "not sent", and SQL still has the job
        log.warning("could not send job %s to the broker; the reconciler will resend it", job_id, exc_info=True)
        return False


def get_job_or_404(session: Session, job_id: str) -> Job:
    job = jobs_repo.get_job(session, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}", param="job_id")
    return job


def cancel_job(session: Session, job_id: str) -> Job:
    job = get_job_or_404(session, job_id)
    if job.status.is_terminal:
        raise Conflict(f"job {job_id} is already {job.status.value}", param="job_id", code="job_finished")
    updated = jobs_repo.request_cancel(session, job_id)
    assert updated is not None
    jobs_repo.add_event(session, JobEvent(job_id=job_id, kind="status", message="cancel requested"))
    return updated
