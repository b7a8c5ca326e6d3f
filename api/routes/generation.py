"""`POST /generate?adapter=NAME`: the base model, or the base model with that adapter."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, TenantDep
from api.routing import StrictJSONRoute
from api.schemas import ErrorResponse
from api.services import generation as service
from api.services.serving_client import ServingClient, get_serving_client
from serving.protocol import GenerateChunk, GenerateRequest, Usage

router = APIRouter(tags=["generation"], route_class=StrictJSONRoute)
ServingDep = Annotated[ServingClient, Depends(get_serving_client)]


class GenerationOut(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    model: str
    adapter: str | None
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


class GenerationChunkOut(BaseModel):
    id: str
    object: Literal["generation.chunk"] = "generation.chunk"
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 422, 503)}


@router.post(
    "/generate",
    response_model=GenerationOut,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}},
)
async def generate(
    body: GenerateRequest,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    serving: ServingDep,
    adapter: Annotated[str | None, Query(max_length=128, description="Adapter name; none: the base model")] = None,
) -> Any:
    service.check_prompt_size(
        settings,
        prompts=None if body.prompt is None else [body.prompt],
        messages=None if body.messages is None else [m.content for m in body.messages],
    )
    name = await service.resolve_adapter(session, settings, tenant, adapter, param="adapter")
    request = service.serving_request(body, name)
    gen_id = f"gen-{uuid.uuid4().hex}"
    if not body.stream:
        result = await service.generate(serving, request)
        return GenerationOut(id=gen_id, adapter=name, **result.model_dump())

    def encode(chunk: GenerateChunk) -> list[str]:
        return [GenerationChunkOut(id=gen_id, **chunk.model_dump()).model_dump_json()]

    chunks = await service.generate_stream(serving, request)
    return StreamingResponse(
        service.sse_events(chunks, encode), media_type="text/event-stream", headers=service.SSE_HEADERS
    )
