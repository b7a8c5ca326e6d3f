from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import (
    EventCursor,
    EventLimit,
    IdempotencyKeyHeader,
    JobDep,
    PageParams,
    SessionDep,
    SettingsDep,
    TenantDep,
)
from api.routing import StrictJSONRoute
from api.schemas import CheckpointOut, ErrorResponse, JobEventOut, JobOut, JobReport, ListResponse
from api.services import evaluations as evaluations_service
from api.services import job_control
from api.services import jobs as service
from api.services.idempotency import mark_replayed
from core.checkpoints import list_checkpoints
from core.jobspec import JobSpec
from core.models import JobStatus
from core.repository import jobs as jobs_repo

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=StrictJSONRoute)


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "An earlier request with this Idempotency-Key made this job"},
        429: {"model": ErrorResponse, "description": "max_active_jobs are queued or running; see Retry-After"},
    },
)
def create_job(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    spec: JobSpec,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut:
    job, replayed = service.create_job(session, settings, tenant, spec, idempotency_key=idempotency_key)
    if replayed:
        mark_replayed(response)
    return JobOut.of(job)


@router.get("", response_model=ListResponse[JobOut])
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    page: PageParams,
    status: JobStatus | None = None,
) -> ListResponse[JobOut]:
    rows, has_more = jobs_repo.list_jobs(session, tenant, limit=page.limit, after=page.after, status=status)
    return ListResponse[JobOut](data=[JobOut.of(j) for j in rows], has_more=has_more)


@router.get("/{job_id}", response_model=JobOut)
def get_job(session: SessionDep, job: JobDep) -> JobOut:
    return JobOut.of(job).model_copy(update={"evaluation": evaluations_service.job_summary(session, job)})


@router.get("/{job_id}/report", response_model=JobReport)
def get_job_report(session: SessionDep, job: JobDep) -> JobReport:
    """Base model vs the job's adapter on the test split, metric by metric."""
    return evaluations_service.job_report(session, job)


@router.get("/{job_id}/events", response_model=ListResponse[JobEventOut])
def list_job_events(
    session: SessionDep,
    tenant: TenantDep,
    job_id: str,
    limit: EventLimit = 100,
    after: EventCursor = None,
) -> ListResponse[JobEventOut]:
    service.get_job_or_404(session, tenant, job_id)  # not JobDep: a bad limit or cursor is a 422 first (api/deps.py)
    rows, has_more = jobs_repo.list_events(session, job_id, limit=limit, after=after)
    return ListResponse[JobEventOut](data=[JobEventOut.of(e) for e in rows], has_more=has_more)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(session: SessionDep, tenant: TenantDep, job_id: str) -> JobOut:
    return JobOut.of(service.cancel_job(session, tenant, job_id))


@router.post("/{job_id}/pause", response_model=JobOut, responses={409: {"model": ErrorResponse}})
def pause_job(session: SessionDep, job: JobDep) -> JobOut:
    """Stop at a checkpoint and free the worker (a queued job pauses at once); resume continues from there."""
    return JobOut.of(job_control.pause_job(session, job))


@router.post("/{job_id}/resume", response_model=JobOut, responses={409: {"model": ErrorResponse}})
def resume_job(session: SessionDep, settings: SettingsDep, job: JobDep) -> JobOut:
    """Queue a paused job again; it continues from its last checkpoint, not from step 0."""
    return JobOut.of(job_control.resume_job(session, settings, job))


@router.get("/{job_id}/checkpoints", response_model=ListResponse[CheckpointOut])
def list_job_checkpoints(settings: SettingsDep, job: JobDep) -> ListResponse[CheckpointOut]:
    rows = [CheckpointOut(**c.to_public()) for c in list_checkpoints(settings, job.id)]
    return ListResponse[CheckpointOut](data=rows, has_more=False)
