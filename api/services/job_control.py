"""Pausing and resuming a job (the native routes and the OpenAI ones share these)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services.jobs import get_job_or_404
from core.errors import Conflict
from core.models import Job, JobEvent, JobStatus
from core.queue import commit_and_send
from core.repository import job_control
from core.repository import jobs as jobs_repo
from core.settings import Settings


def check_controllable(job: Job) -> None:
    """Only live work can be paused or resumed: 409 for a finished job or one being cancelled."""
    if job.status.is_terminal:
        raise Conflict(f"job {job.id} is already {job.status.value}", param="job_id", code="job_finished")
    if job.cancel_requested:
        raise Conflict(f"job {job.id} is being cancelled", param="job_id", code="job_cancelling")


def pause_job(session: Session, job: Job) -> Job:
    """Queued: paused at once. Running: asked to pause at its next step (a checkpoint is saved there). Paused: as is."""
    check_controllable(job)
    if job.status in (JobStatus.queued, JobStatus.running) and not job.pause_requested:
        was = job.status
        job_control.request_pause(session, job.id)
        message = "job paused (it was queued)" if was == JobStatus.queued else "pause requested"
        jobs_repo.add_event(session, JobEvent(job_id=job.id, kind="status", message=message))
    return job  # request_pause expired it: what the caller reads next is the row as it is now


def resume_job(session: Session, settings: Settings, job: Job) -> Job:
    """Paused: queued again, to continue from its last checkpoint. A pause not reached yet is called off. Else as is."""
    check_controllable(job)
    if job.status == JobStatus.paused or job.pause_requested:
        if job_control.resume(session, job.id):
            jobs_repo.add_event(session, JobEvent(job_id=job.id, kind="status", message="job resumed: queued"))
            commit_and_send(session, settings, Job, job.id)
        else:
            jobs_repo.add_event(session, JobEvent(job_id=job.id, kind="status", message="pause called off"))
    return job  # resume expired it, as above


def pause_or_as_is(session: Session, tenant_id: str, job_id: str) -> Job:
    """The OpenAI view: a job that can no longer pause is answered as it is (a 409 reads as "retry" to its client)."""
    job = get_job_or_404(session, tenant_id, job_id)
    if job.status.is_terminal or job.cancel_requested:
        return job
    return pause_job(session, job)


def resume_or_as_is(session: Session, settings: Settings, tenant_id: str, job_id: str) -> Job:
    """The OpenAI view of resume: a finished or cancelling job is answered as it is."""
    job = get_job_or_404(session, tenant_id, job_id)
    if job.status.is_terminal or job.cancel_requested:
        return job
    return resume_job(session, settings, job)
