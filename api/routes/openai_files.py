"""/v1/files: OpenAI's files API over the datasets service (api.services.openai_fine_tuning maps the names)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response

from api.deps import SessionDep, SettingsDep, TenantDep
from api.openai_schemas import FileDeleted, FileList, FileObject
from api.routing import StrictJSONRoute
from api.services import openai_fine_tuning as service

router = APIRouter(prefix="/v1/files", tags=["openai fine-tuning"], route_class=StrictJSONRoute)


@router.post("", response_model=FileObject)
async def create_file(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="JSONL training data, as for POST /datasets")],
    purpose: Annotated[str, Form(max_length=64, description="fine-tune (the only purpose stored here)")],
) -> FileObject:
    return service.file_of(await service.create_file(session, settings, tenant, file=file, purpose=purpose))


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    data, has_more = service.list_files(session, tenant, purpose=purpose, limit=limit, after=after, order=order)
    return FileList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(session: SessionDep, tenant: TenantDep, file_id: str) -> FileObject:
    return service.get_file(session, tenant, file_id)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(session: SessionDep, settings: SettingsDep, tenant: TenantDep, file_id: str) -> FileDeleted:
    return FileDeleted(id=service.delete_file(session, settings, tenant, file_id), deleted=True)


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(session: SessionDep, settings: SettingsDep, tenant: TenantDep, file_id: str) -> Response:
    content = service.file_content(session, settings, tenant, file_id)
    if isinstance(content, bytes):
        return Response(content, media_type="text/csv")
    return FileResponse(content, media_type="application/octet-stream")
