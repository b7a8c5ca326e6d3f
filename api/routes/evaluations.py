from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import EvaluationDep, PageParams, SessionDep, SettingsDep, TenantDep
from api.routing import StrictJSONRoute
from api.schemas import ErrorResponse, EvaluationOut, EvaluationSamplePage, ListResponse
from api.services import evaluations as service
from core.bounds import MAX_INT32
from core.evaluation.spec import EvaluationSpec
from core.repository import evaluations as evaluations_repo

router = APIRouter(prefix="/evaluations", tags=["evaluations"], route_class=StrictJSONRoute)


@router.post("", status_code=201, response_model=EvaluationOut)
def create_evaluation(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, spec: EvaluationSpec
) -> EvaluationOut:
    return EvaluationOut.of(service.create_evaluation(session, settings, tenant, spec))


@router.get("", response_model=ListResponse[EvaluationOut])
def list_evaluations(
    session: SessionDep,
    tenant: TenantDep,
    page: PageParams,
    job_id: Annotated[str | None, Query(max_length=40)] = None,
) -> ListResponse[EvaluationOut]:
    rows, has_more = evaluations_repo.list_evaluations(
        session, tenant, limit=page.limit, after=page.after, job_id=job_id
    )
    return ListResponse[EvaluationOut](data=[EvaluationOut.of(e) for e in rows], has_more=has_more)


@router.get("/{evaluation_id}", response_model=EvaluationOut)
def get_evaluation(evaluation: EvaluationDep) -> EvaluationOut:
    return EvaluationOut.of(evaluation)


@router.post(
    "/{evaluation_id}/cancel",
    response_model=EvaluationOut,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def cancel_evaluation(session: SessionDep, evaluation: EvaluationDep) -> EvaluationOut:
    """A queued evaluation is `cancelled` at once; a running one stays `running` with `cancel_requested` until its
    worker stops it. 409 once it has ended."""
    return EvaluationOut.of(service.cancel_evaluation(session, evaluation))


@router.get("/{evaluation_id}/samples", response_model=EvaluationSamplePage)
def list_samples(
    session: SessionDep,
    tenant: TenantDep,
    evaluation_id: str,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
    scale: Annotated[
        float | None, Query(allow_inf_nan=False, description="Only the samples at this adapter scale")
    ] = None,
) -> EvaluationSamplePage:
    # Not EvaluationDep: a bad limit, offset or scale is a 422 before the 404 (api/deps.py).
    evaluation = service.get_evaluation_or_404(session, tenant, evaluation_id)
    return service.sample_page(session, evaluation, limit=limit, offset=offset, scale=scale)
