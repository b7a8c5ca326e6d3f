"""OpenAI-compatible endpoints (`/v1/models`, `/v1/completions`, `/v1/chat/completions`); `model` is the
served base model's name or an adapter name, so the official `openai` client works unchanged."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.routing import StrictJSONRoute
from api.schemas import ErrorResponse, unix
from api.services import generation as service
from api.services.serving_client import ServingClient, get_serving_client
from core.bounds import MAX_INT32
from core.errors import InvalidInput
from serving.protocol import (
    MAX_MESSAGES,
    MAX_PROMPT_CHARS,
    ChatMessage,
    GenerateChunk,
    GenerateRequest,
    SamplingOptions,
    Usage,
)

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJSONRoute)
ServingDep = Annotated[ServingClient, Depends(get_serving_client)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 422, 503)}
SAMPLING_FIELDS = set(SamplingOptions.model_fields)
# Schema bounds; the route applies the deployment's settings (max_prompt_chars, max_prompts_per_request) within them.
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
MAX_PROMPTS = 128


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class OpenAIRequest(SamplingOptions):
    """Fields both endpoints share; anything not listed (or not supported) is a 422 naming it."""

    model: str = Field(max_length=512)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)


class CompletionRequest(OpenAIRequest):
    prompt: PromptText | Annotated[list[PromptText], Field(max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT32)
    echo: Literal[False] = False
    logprobs: None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: PromptText


class OpenAIChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: PromptText | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def plain(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=self.text())


class ChatCompletionRequest(OpenAIRequest):
    messages: list[OpenAIChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: Literal[False] = False


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


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionOut(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunkOut(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def _sampling(body: OpenAIRequest, **overrides: Any) -> dict[str, Any]:
    values = body.model_dump(include=SAMPLING_FIELDS)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def _include_usage(body: OpenAIRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _total(usages: list[Usage]) -> Usage:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@router.get("/models", response_model=ModelsOut)
async def list_models(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelsOut:
    base, adapters = await run_in_threadpool(service.servable_models, session, settings, tenant)
    now = int(time.time())
    data = [ModelOut(id=base, created=now, root=settings.base_model, parent=None)]
    data += [ModelOut(id=a.name, created=unix(a.created_at) or now, root=a.name, parent=base) for a in adapters]
    return ModelsOut(data=data)


@router.post("/completions", response_model=CompletionOut, responses=ERRORS)
async def create_completion(
    body: CompletionRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep, serving: ServingDep
) -> Any:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    service.check_prompt_size(settings, prompts=prompts)
    adapter = await service.resolve_adapter(session, settings, tenant, body.model, param="model")
    if not prompts:
        raise InvalidInput("prompt must not be empty", param="prompt")
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def request(prompt: str) -> Any:
        return service.serving_request(GenerateRequest(prompt=prompt, stream=body.stream, **_sampling(body)), adapter)

    if not body.stream:
        results = await asyncio.gather(*(service.generate(serving, request(p), param="model") for p in prompts))
        choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)]
        return CompletionOut(
            id=cid, created=created, model=body.model, choices=choices, usage=_total([r.usage for r in results])
        )
    if len(prompts) != 1:
        raise InvalidInput("streaming takes a single prompt", param="prompt")

    def encode(chunk: GenerateChunk) -> list[str]:
        choice = CompletionChoice(index=0, text=chunk.text, finish_reason=chunk.finish_reason)
        out = [CompletionOut(id=cid, created=created, model=body.model, choices=[choice]).model_dump_json()]
        if chunk.usage is not None and _include_usage(body):
            out.append(
                CompletionOut(
                    id=cid, created=created, model=body.model, choices=[], usage=chunk.usage
                ).model_dump_json()
            )
        return out

    chunks = await service.generate_stream(serving, request(prompts[0]), param="model")
    return StreamingResponse(
        service.sse_events(chunks, encode), media_type="text/event-stream", headers=service.SSE_HEADERS
    )


@router.post("/chat/completions", response_model=ChatCompletionOut, responses=ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep, serving: ServingDep
) -> Any:
    # A message's text parts are joined: the total is checked before any ChatMessage (1M characters at most) is made.
    service.check_prompt_size(settings, messages=[m.text() for m in body.messages])
    adapter = await service.resolve_adapter(session, settings, tenant, body.model, param="model")
    generate = GenerateRequest(
        messages=[m.plain() for m in body.messages],
        stream=body.stream,
        **_sampling(body, max_tokens=body.max_completion_tokens),
    )
    request = service.serving_request(generate, adapter)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        r = await service.generate(serving, request, param="model")
        choice = ChatChoice(message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
        return ChatCompletionOut(id=cid, created=created, model=body.model, choices=[choice], usage=r.usage)

    first = True

    def encode(chunk: GenerateChunk) -> list[str]:
        nonlocal first
        delta = Delta(role="assistant" if first else None, content=chunk.text)
        first = False
        choice = ChatChunkChoice(delta=delta, finish_reason=chunk.finish_reason)
        out = [
            ChatCompletionChunkOut(id=cid, created=created, model=body.model, choices=[choice]).model_dump_json(
                exclude_none=True
            )
        ]
        if chunk.usage is not None and _include_usage(body):
            out.append(
                ChatCompletionChunkOut(
                    id=cid, created=created, model=body.model, choices=[], usage=chunk.usage
                ).model_dump_json(exclude_none=True)
            )
        return out

    chunks = await service.generate_stream(serving, request, param="model")
    return StreamingResponse(
        service.sse_events(chunks, encode), media_type="text/event-stream", headers=service.SSE_HEADERS
    )
