from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from api.deps import IdempotencyKeyHeader, SessionDep, SettingsDep, TenantDep
from api.routing import StrictJSONRoute
from api.schemas import DatasetOut, ListResponse
from api.services import datasets as service
from api.services.idempotency import mark_replayed
from core.bounds import MAX_INT32
from core.repository import datasets as datasets_repo

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=StrictJSONRoute)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={
        200: {"model": DatasetOut, "description": "An earlier request with this Idempotency-Key made this dataset"}
    },
)
async def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    response: Response,
    file: Annotated[UploadFile, File(description="JSONL: chat, prompt/completion or instruction rows")],
    test_file: Annotated[UploadFile | None, File(description="Held-out test split, same format")] = None,
    test_fraction: Annotated[
        float | None, Form(gt=0, lt=1, description="Hold out this share as the test split")
    ] = None,
    seed: Annotated[int, Form(ge=0, le=MAX_INT32, description="Seed of the test_fraction split")] = 0,
    idempotency_key: IdempotencyKeyHeader = None,
) -> DatasetOut:
    options = service.UploadOptions(test_fraction=test_fraction, seed=seed)
    dataset, replayed = await service.create_dataset(
        session, settings, tenant, file=file, test_file=test_file, options=options, idempotency_key=idempotency_key
    )
    if replayed:
        mark_replayed(response)
    return DatasetOut.of(dataset)


@router.get("", response_model=ListResponse[DatasetOut])
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> ListResponse[DatasetOut]:
    rows, has_more = datasets_repo.list_datasets(session, tenant, limit=limit, after=after)
    return ListResponse[DatasetOut](data=[DatasetOut.of(d) for d in rows], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(session: SessionDep, tenant: TenantDep, dataset_id: str) -> DatasetOut:
    return DatasetOut.of(service.get_dataset_or_404(session, tenant, dataset_id))
