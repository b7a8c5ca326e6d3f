"""/v1/fine_tuning/jobs/{id}/pause and /resume: the native pause and resume, answered with the OpenAI job object."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep, SettingsDep, TenantDep
from api.openai_schemas import FineTuningJob
from api.routing import StrictJSONRoute
from api.services import job_control
from api.services.openai_fine_tuning import job_of

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai fine-tuning"], route_class=StrictJSONRoute)


@router.post("/{job_id}/pause", response_model=FineTuningJob)
def pause_job(session: SessionDep, tenant: TenantDep, job_id: str) -> FineTuningJob:
    """Pause at a checkpoint, freeing the worker; status `paused` once there (a queued job at once)."""
    return job_of(job_control.pause_or_as_is(session, tenant, job_id))


@router.post("/{job_id}/resume", response_model=FineTuningJob)
def resume_job(session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: str) -> FineTuningJob:
    """Resume a paused job from its last checkpoint."""
    return job_of(job_control.resume_or_as_is(session, settings, tenant, job_id))
