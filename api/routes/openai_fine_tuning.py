"""/v1/fine_tuning/jobs: OpenAI's fine-tuning jobs API over the native jobs service (the same rows as /jobs)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.openai_schemas import (
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
    Model,
    ModelDeleted,
)
from api.routing import StrictJSONRoute
from api.services import adapters as adapters_service
from api.services import jobs as jobs_service
from api.services import openai_fine_tuning as service
from api.services.serving_client import ServingClient, get_serving_client

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai fine-tuning"], route_class=StrictJSONRoute)


@router.post("", response_model=FineTuningJob)
def create_job(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    # A plain object, validated by the service: OpenAI answers a bad field with 400 naming it, not FastAPI's 422.
    body: Annotated[dict[str, Any], Body(description="openai.types.fine_tuning.JobCreateParams")],
) -> FineTuningJob:
    return service.job_of(service.create_job(session, settings, tenant, body))


@router.get("", response_model=FineTuningJobList)
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> FineTuningJobList:
    """`metadata[k]=v` (any number of keys, OpenAI's filter) lists only jobs whose metadata holds them all."""
    query = list(request.query_params.multi_items())
    rows, has_more = service.list_jobs(session, tenant, limit=limit, after=after, query=query)
    return FineTuningJobList(data=rows, has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve_job(session: SessionDep, tenant: TenantDep, job_id: str) -> FineTuningJob:
    return service.job_of(jobs_service.get_job_or_404(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(session: SessionDep, tenant: TenantDep, job_id: str) -> FineTuningJob:
    return service.job_of(service.cancel_job(session, tenant, job_id))


@router.get("/{job_id}/events", response_model=FineTuningJobEventList)
def list_events(
    session: SessionDep,
    tenant: TenantDep,
    job_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> FineTuningJobEventList:
    rows, has_more = service.list_events(session, tenant, job_id, limit=limit, after=after)
    return FineTuningJobEventList(data=rows, has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def list_checkpoints(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    job_id: str,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> FineTuningJobCheckpointList:
    rows = service.list_checkpoints(session, settings, tenant, job_id)
    if after is not None:
        ids = [c.id for c in rows]
        rows = rows[ids.index(after) + 1 :] if after in ids else []
    page = rows[:limit]
    return FineTuningJobCheckpointList(
        data=page,
        has_more=len(rows) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


models_router = APIRouter(prefix="/v1/models", tags=["openai fine-tuning"], route_class=StrictJSONRoute)


@models_router.get("/{model}", response_model=Model)
def retrieve_model(session: SessionDep, settings: SettingsDep, tenant: TenantDep, model: str) -> Model:
    return service.model_of(session, settings, tenant, model)


@models_router.delete("/{model}", response_model=ModelDeleted)
async def delete_model(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    model: str,
    serving: Annotated[ServingClient, Depends(get_serving_client)],
) -> ModelDeleted:
    """An ft: model's adapter, deleted as DELETE /adapters/{name} deletes it (owner only; never served again)."""
    name = await run_in_threadpool(service.deletable_adapter, session, settings, tenant, model)
    await adapters_service.delete_adapter(session, settings, serving, tenant, name)
    return ModelDeleted(id=model, deleted=True)
