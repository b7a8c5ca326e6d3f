"""OpenAI-compatible endpoints: `/v1/models` from the registry, and `/v1/completions` and `/v1/chat/completions`
passed through to vLLM's own OpenAI server, so every feature vLLM implements (logprobs, n with seeds, structured
outputs, tools where the chat template has them, prompt token ids, stream usage) works with the official client.
`model` is the base model's name or one of the tenant's adapters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.generation_schemas import ChatCompletionBody, CompletionBody, OpenAIBody
from api.routing import StrictJSONRoute
from api.schemas import ErrorResponse
from api.services import generation as service
from api.services import openai_fine_tuning
from api.services.serving_client import ServingClient, get_serving_client
from core.serving_contract import CHAT_COMPLETIONS_PATH, COMPLETIONS_PATH, tenant_cache_salt

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJSONRoute)
ServingDep = Annotated[ServingClient, Depends(get_serving_client)]
ANSWER = {
    "description": "vLLM's OpenAI answer as it sent it: JSON, or server-sent events when `stream` is true",
    "content": {"application/json": {}, "text/event-stream": {}},
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: ANSWER,
    **{code: {"model": ErrorResponse} for code in (400, 404, 422, 429, 503)},
}


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tuneserve"
    root: str
    parent: str | None


class ModelsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


@router.get("/models", response_model=ModelsOut)
async def list_models(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelsOut:
    """The base model and its aliases, the tenant's servable adapters, and their ft: names (a job's adapter, its
    published checkpoints)."""
    listed = await run_in_threadpool(openai_fine_tuning.listed_models, session, settings, tenant)
    base = settings.served_model_name
    data = [
        ModelOut(id=m.id, created=m.created, owned_by=m.owned_by, root=settings.base_model, parent=None)
        if m.owned_by == "tuneserve"
        else ModelOut(id=m.id, created=m.created, owned_by=m.owned_by, root=m.id, parent=base)
        for m in listed
    ]
    return ModelsOut(data=data)


async def _forward(
    request: Request, path: str, body: OpenAIBody, session: SessionDep, settings: SettingsDep, tenant: str,
    serving: ServingClient,
) -> Any:  # fmt: skip
    body.check_fields()
    service.check_generation_limits(settings, body.model_dump(exclude_unset=True))
    adapter = await service.resolve_adapter(session, settings, tenant, body.model, param="model")
    forwarded = body.forwarded(adapter or settings.served_model_name, cache_salt=tenant_cache_salt(settings, tenant))
    slots = service.generation_slots(request.app.state, settings)
    rename = {"input_tokens": "messages" if path == CHAT_COMPLETIONS_PATH else "prompt"}
    if not body.stream:
        answer = await service.complete(
            request, serving, slots, tenant, path, forwarded, adapter=adapter, rename=rename
        )
        return JSONResponse(answer)
    lines = await service.open_stream(request, serving, slots, tenant, path, forwarded, adapter=adapter, rename=rename)
    return StreamingResponse(
        service.relay_sse(lines),
        media_type="text/event-stream",
        headers=service.SSE_HEADERS,
    )


@router.post("/completions", responses=RESPONSES)
async def create_completion(
    request: Request,
    body: CompletionBody,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    serving: ServingDep,
) -> Any:
    prompts = body.prompt if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else [body.prompt]
    service.check_prompt_size(settings, prompts=prompts)
    return await _forward(request, COMPLETIONS_PATH, body, session, settings, tenant, serving)


@router.post("/chat/completions", responses=RESPONSES)
async def create_chat_completion(
    request: Request,
    body: ChatCompletionBody,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    serving: ServingDep,
) -> Any:
    service.check_prompt_size(settings, messages=body.messages)
    return await _forward(request, CHAT_COMPLETIONS_PATH, body, session, settings, tenant, serving)
