from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep
from api.schemas import AdapterOperationOut, AdapterOut, ErrorResponse, ListResponse
from api.services import adapters as adapters_service
from api.services import adapter_operations as operations_service
from api.services.serving_client import ServingClient, get_serving_client
from core.adapter_ops import MAX_SCALE, MIN_SCALE
from core.errors import NotFound
from core.repository import adapters as adapters_repo

router = APIRouter(prefix="/adapters", tags=["adapters"])
operations_router = APIRouter(prefix="/adapter-operations", tags=["adapters"])


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: float = Field(ge=MIN_SCALE, le=MAX_SCALE, allow_inf_nan=False, description="The LoRA delta times this")


@router.get("", response_model=ListResponse[AdapterOut])
def list_adapters(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> ListResponse[AdapterOut]:
    rows, has_more = adapters_repo.list_adapters(session, limit=limit, after=after)
    return ListResponse[AdapterOut](data=[AdapterOut.of(a) for a in rows], has_more=has_more)


@router.get("/{name}", response_model=AdapterOut)
def get_adapter(session: SessionDep, name: str) -> AdapterOut:
    adapter = adapters_repo.get_adapter_by_name(session, name)
    if adapter is None or adapter.status.value == "deleted":
        raise NotFound(f"no adapter named {name!r}", param="name")
    return AdapterOut.of(adapter)


@router.post("/{name}/derive", status_code=202, response_model=AdapterOperationOut)
def derive_adapter(session: SessionDep, settings: SettingsDep, name: str, body: ScaleBody) -> AdapterOperationOut:
    """A new immutable adapter with B times scale, made by a worker; poll /adapter-operations/{id}."""
    return AdapterOperationOut.of(operations_service.create_operation(session, settings, name=name, kind="derive", scale=body.scale))


@router.post("/{name}/merge", status_code=202, response_model=AdapterOperationOut)
def merge_adapter(session: SessionDep, settings: SettingsDep, name: str, body: ScaleBody) -> AdapterOperationOut:
    """A full model W0 + scale·(alpha/r)·BA, made by a worker; poll /adapter-operations/{id}."""
    return AdapterOperationOut.of(operations_service.create_operation(session, settings, name=name, kind="merge", scale=body.scale))


@operations_router.get("/{operation_id}", response_model=AdapterOperationOut)
def get_adapter_operation(session: SessionDep, operation_id: str) -> AdapterOperationOut:
    return AdapterOperationOut.of(operations_service.get_operation_or_404(session, operation_id))


class AdapterDeletedOut(BaseModel):
    id: str
    name: str
    object: str = "adapter"
    deleted: bool = True


@router.delete("/{name}", response_model=AdapterDeletedOut, responses={404: {"model": ErrorResponse}})
async def delete_adapter(
    session: SessionDep, name: str, serving: Annotated[ServingClient, Depends(get_serving_client)]
) -> AdapterDeletedOut:
    """Delete for good: the name is never served again (not even with other weights)."""
    adapter = await adapters_service.delete_adapter(session, serving, name)
    return AdapterDeletedOut(id=adapter.id, name=adapter.name)
