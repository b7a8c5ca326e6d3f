"""/v1/fine_tuning/alpha/graders: OpenAI's grader validate and run, on the graders reinforcement jobs use."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from api.deps import TenantDep
from api.routing import StrictJSONRoute
from api.services import openai_graders as service
from api.services.openai_graders import GraderRunResponse, GraderValidateResponse

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["openai fine-tuning"], route_class=StrictJSONRoute)


# The tenant is required (a key, like every /v1 route) though a grader reads no stored data: nothing here is open.
@router.post("/validate", response_model=GraderValidateResponse)
def validate_grader(
    _tenant: TenantDep,
    # A plain object, validated by the service: OpenAI answers a bad field with 400 naming it, not FastAPI's 422.
    body: Annotated[dict[str, Any], Body(description="openai.types.fine_tuning.alpha.GraderValidateParams")],
) -> GraderValidateResponse:
    return service.validate_grader(body)


@router.post("/run", response_model=GraderRunResponse)
def run_grader(
    _tenant: TenantDep,
    body: Annotated[dict[str, Any], Body(description="openai.types.fine_tuning.alpha.GraderRunParams")],
) -> GraderRunResponse:
    return service.run_grader(body)
