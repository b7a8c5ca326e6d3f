from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdapterDep, PageParams, SessionDep, SettingsDep, TenantDep
from api.routing import StrictJSONRoute
from api.schemas import AdapterOperationOut, AdapterOut, ErrorResponse, ListResponse
from api.services import adapter_imports as imports_service
from api.services import adapter_operations as operations_service
from api.services import adapters as adapters_service
from api.services.serving_client import ServingClient, get_serving_client
from core.adapter_ops import MAX_SCALE, MIN_SCALE
from core.models import OperationKind
from core.repository import adapters as adapters_repo

router = APIRouter(prefix="/adapters", tags=["adapters"], route_class=StrictJSONRoute)
operations_router = APIRouter(prefix="/adapter-operations", tags=["adapters"], route_class=StrictJSONRoute)


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: float = Field(ge=MIN_SCALE, le=MAX_SCALE, allow_inf_nan=False, description="The LoRA delta times this")


@router.post(
    "",
    status_code=202,
    response_model=AdapterOut,
    responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)
async def import_adapter(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[
        UploadFile,
        File(
            description="A PEFT LoRA adapter as .tar, .tar.gz or .zip: adapter_config.json "
            "and adapter_model.safetensors, at the root or in one folder"
        ),
    ],
    suffix: Annotated[
        str | None, Form(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="Part of the new name")
    ] = None,
) -> AdapterOut:
    """Import an adapter made elsewhere. It is checked at once (422 naming the member on a bad archive) and
    is `validating` until a worker's canary shows it changes the base model's output: then `ready`, else
    `unhealthy` (never served). Poll GET /adapters/{name}."""
    return AdapterOut.of(await imports_service.import_adapter(session, settings, tenant, file, suffix=suffix))


@router.get("", response_model=ListResponse[AdapterOut])
def list_adapters(session: SessionDep, tenant: TenantDep, page: PageParams) -> ListResponse[AdapterOut]:
    rows, has_more = adapters_repo.list_adapters(session, tenant, limit=page.limit, after=page.after)
    return ListResponse[AdapterOut](data=[AdapterOut.of(a) for a in rows], has_more=has_more)


@router.get("/{name}", response_model=AdapterOut)
def get_adapter(adapter: AdapterDep) -> AdapterOut:
    return AdapterOut.of(adapter)


@router.post("/{name}/derive", status_code=202, response_model=AdapterOperationOut)
def derive_adapter(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, name: str, body: ScaleBody
) -> AdapterOperationOut:
    """A new immutable adapter with B times scale, made by a worker; poll /adapter-operations/{id}."""
    operation = operations_service.create_operation(
        session, settings, tenant, name=name, kind=OperationKind.derive, scale=body.scale
    )
    return AdapterOperationOut.of(operation)


@router.post("/{name}/merge", status_code=202, response_model=AdapterOperationOut)
def merge_adapter(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, name: str, body: ScaleBody
) -> AdapterOperationOut:
    """A full model W0 + scale·(alpha/r)·BA, made by a worker; poll /adapter-operations/{id}."""
    operation = operations_service.create_operation(
        session, settings, tenant, name=name, kind=OperationKind.merge, scale=body.scale
    )
    return AdapterOperationOut.of(operation)


@operations_router.get("/{operation_id}", response_model=AdapterOperationOut)
def get_adapter_operation(session: SessionDep, tenant: TenantDep, operation_id: str) -> AdapterOperationOut:
    return AdapterOperationOut.of(operations_service.get_operation_or_404(session, tenant, operation_id))


@operations_router.post(
    "/{operation_id}/cancel",
    response_model=AdapterOperationOut,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
def cancel_adapter_operation(session: SessionDep, tenant: TenantDep, operation_id: str) -> AdapterOperationOut:
    """A queued operation is `cancelled` at once; a running one stays `running` with `cancel_requested` until its
    worker stops it. 409 once it has ended. A cancelled canary leaves its imported adapter `unhealthy`."""
    return AdapterOperationOut.of(operations_service.cancel_operation(session, tenant, operation_id))


class AdapterDeletedOut(BaseModel):
    id: str
    name: str
    object: str = "adapter"
    deleted: bool = True
    files_deleted: bool = Field(
        description="Its files are gone now; false while queued or running work still names it (they go once it ended)"
    )


@router.delete("/{name}", response_model=AdapterDeletedOut, responses={404: {"model": ErrorResponse}})
async def delete_adapter(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    name: str,
    serving: Annotated[ServingClient, Depends(get_serving_client)],
) -> AdapterDeletedOut:
    """Delete for good: the name is never served again (not even with other weights), and its files are deleted
    (at once, or once the queued or running work that names it ended)."""
    adapter, freed = await adapters_service.delete_adapter(session, settings, serving, tenant, name)
    return AdapterDeletedOut(id=adapter.id, name=adapter.name, files_deleted=freed)
