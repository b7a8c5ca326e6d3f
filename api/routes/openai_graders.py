"""/v1/fine_tuning/alpha/graders: OpenAI's grader validate and run, on the graders reinforcement jobs use."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from api.deps import SessionDep, SettingsDep, TenantDep
from api.routing import StrictJSONRoute
from api.services import openai_graders as service
from api.services.openai_graders import GraderContext, GraderRunResponse, GraderValidateResponse
from api.services.serving_client import ServingClient, get_serving_client

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["openai fine-tuning"], route_class=StrictJSONRoute)
ServingDep = Annotated[ServingClient, Depends(get_serving_client)]


def grader_context(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep, serving: ServingDep
) -> GraderContext:
    """The tenant (a key, like every /v1 route) and serving, for a model grader's judge."""
    return GraderContext(request=request, session=session, settings=settings, tenant=tenant, serving=serving)


ContextDep = Annotated[GraderContext, Depends(grader_context)]


@router.post("/validate", response_model=GraderValidateResponse)
async def validate_grader(
    ctx: ContextDep,
    # A plain object, validated by the service: OpenAI answers a bad field with 400 naming it, not FastAPI's 422.
    body: Annotated[dict[str, Any], Body(description="openai.types.fine_tuning.alpha.GraderValidateParams")],
) -> GraderValidateResponse:
    return await service.validate_grader(body, ctx)


@router.post("/run", response_model=GraderRunResponse)
async def run_grader(
    ctx: ContextDep,
    body: Annotated[dict[str, Any], Body(description="openai.types.fine_tuning.alpha.GraderRunParams")],
) -> GraderRunResponse:
    return await service.run_grader(body, ctx)
