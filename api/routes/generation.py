"""`POST /generate?adapter=NAME`: the base model, or the base model with that adapter; tuneserve's own compact shape
(text, token ids, usage), built on the same pass-through as `/v1`: a prompt goes to vLLM's completions, messages to
its chat completions (the model's chat template, as training used it: docs/architecture.md, invariant 8)."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, SettingsDep, TenantDep
from api.generation_schemas import GenerateRequest, GenerationChunkOut, GenerationOut, Usage
from api.routing import StrictJSONRoute
from api.schemas import ErrorResponse
from api.services import generation as service
from api.services.serving_client import ServingClient, get_serving_client
from core.errors import InvalidInput
from core.serving_contract import CHAT_COMPLETIONS_PATH, COMPLETIONS_PATH, tenant_cache_salt

router = APIRouter(tags=["generation"], route_class=StrictJSONRoute)
ServingDep = Annotated[ServingClient, Depends(get_serving_client)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 422, 429, 503)}


def _openai_body(body: GenerateRequest, model: str, *, cache_salt: str) -> tuple[str, dict[str, Any]]:
    """The vLLM request for a /generate body: its path and JSON, with the tenant's cache_salt as on /v1."""
    out: dict[str, Any] = body.model_dump(exclude={"prompt", "messages"}, exclude_none=True)
    out.update(model=model, return_token_ids=True, cache_salt=cache_salt)
    if body.stream:
        out["stream_options"] = {"include_usage": True}
    if body.messages is not None:
        out["messages"] = [m.model_dump() for m in body.messages]
        return CHAT_COMPLETIONS_PATH, out
    out["prompt"] = body.prompt
    return COMPLETIONS_PATH, out


def _choice_text(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return str(choice["message"].get("content") or "")
    if "delta" in choice:
        return str(choice["delta"].get("content") or "")
    return str(choice.get("text") or "")


@router.post(
    "/generate",
    response_model=GenerationOut,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}},
)
async def generate(
    request: Request,
    body: GenerateRequest,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    serving: ServingDep,
    adapter: Annotated[str | None, Query(max_length=128, description="Adapter name; none: the base model")] = None,
) -> Any:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidInput("give exactly one of prompt or messages", param="prompt")
    service.check_prompt_size(
        settings,
        prompts=None if body.prompt is None else [body.prompt],
        messages=None if body.messages is None else [m.model_dump() for m in body.messages],
    )
    service.check_generation_limits(settings, body.model_dump(exclude_none=True))
    name = await service.resolve_adapter(session, settings, tenant, adapter, param="adapter")
    path, forwarded = _openai_body(
        body, name or settings.served_model_name, cache_salt=tenant_cache_salt(settings, tenant)
    )
    slots = service.generation_slots(request.app.state, settings)
    rename = {"model": "adapter", "input_tokens": "prompt" if body.prompt is not None else "messages"}
    gen_id = f"gen-{uuid.uuid4().hex}"
    if not body.stream:
        answer = await service.complete(request, serving, slots, tenant, path, forwarded, adapter=name, rename=rename)
        choice = answer["choices"][0]
        return GenerationOut(
            id=gen_id,
            model=name or settings.served_model_name,
            adapter=name,
            text=_choice_text(choice),
            token_ids=choice.get("token_ids") or [],
            finish_reason=choice.get("finish_reason"),
            usage=Usage.model_validate(answer["usage"]),
        )

    finished: dict[str, Any] = {}  # the finishing choice, held until the usage event that follows it

    def chunk(data: str) -> str | None:
        """vLLM's events as /generate's chunks: text and token ids as they come; finish_reason and usage together
        on the last chunk (vLLM sends the usage in an event of its own, after the finishing one)."""
        event = json.loads(data)
        choices, usage = event.get("choices") or [], event.get("usage")
        choice = choices[0] if choices else {}
        if choice.get("finish_reason") and usage is None:
            finished.update(choice)
            return None
        if usage is not None:
            choice = {**finished, **choice}
        elif not _choice_text(choice) and not choice.get("token_ids"):
            return None  # the chat stream's opening role-only event
        return GenerationChunkOut(
            id=gen_id,
            text=_choice_text(choice),
            token_ids=choice.get("token_ids") or [],
            finish_reason=choice.get("finish_reason"),
            usage=Usage.model_validate(usage) if usage else None,
        ).model_dump_json()

    lines = await service.open_stream(request, serving, slots, tenant, path, forwarded, adapter=name, rename=rename)
    return StreamingResponse(
        service.relay_sse(lines, chunk),
        media_type="text/event-stream",
        headers=service.SSE_HEADERS,
    )
