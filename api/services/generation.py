"""Generation for the API: resolve the adapter in SQL, forward to serving, shape the answer (plain or SSE)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.services.serving_client import ServingClient, ServingStreamError
from core.errors import InvalidInput, NotFound, TuneserveError
from core.models import Adapter, AdapterStatus
from core.repository import adapters as adapters_repo
from core.settings import Settings
from serving.protocol import GenerateChunk, GenerateRequest, GenerateResult, ServingRequest

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _servable_adapter(session: Session, tenant_id: str, name: str, *, param: str) -> Adapter:
    adapter = adapters_repo.get_owned_adapter(session, tenant_id, name)
    if adapter is None or adapter.status == AdapterStatus.deleted:
        raise NotFound(f"no adapter or model named {name!r}", param=param)
    if adapter.status != AdapterStatus.ready or not adapter.servable:
        reason = adapter.servable_reason or f"its status is {adapter.status.value}"
        raise InvalidInput(f"adapter {name!r} cannot be served: {reason}", param=param, code="adapter_not_servable")
    return adapter


async def resolve_adapter(
    session: Session, settings: Settings, tenant_id: str, name: str | None, *, param: str
) -> str | None:
    """The tenant's adapter to use for `name` (None: the base model), or 404 naming `param`.

    Serving looks names up without a tenant, so this check is what keeps tenants apart: it runs first.
    """
    if name is None or name in (settings.served_model_name, settings.base_model):
        return None
    adapter = await run_in_threadpool(_servable_adapter, session, tenant_id, name, param=param)
    # The lookup's connection goes back to the pool before the route waits on serving, which may take minutes.
    await run_in_threadpool(session.commit)
    return adapter.name


def check_prompt_size(
    settings: Settings, *, prompts: list[str] | None = None, messages: list[str] | None = None
) -> None:
    """Refuse a prompt (or chat) past the deployment's character limits, before anything is tokenized: 422
    naming the field and the setting. Each prompt counts alone; chat messages (their contents) count together."""
    limit = settings.max_prompt_chars
    if prompts is not None:
        if len(prompts) > settings.max_prompts_per_request:
            raise InvalidInput(
                f"prompt: {len(prompts)} prompts; the limit is {settings.max_prompts_per_request} per request "
                "(TUNESERVE_MAX_PROMPTS_PER_REQUEST)",
                param="prompt",
                code="too_many_prompts",
            )
        for i, prompt in enumerate(prompts):
            if len(prompt) > limit:
                param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise InvalidInput(
                    f"{param}: {len(prompt)} characters; the limit is {limit} (TUNESERVE_MAX_PROMPT_CHARS)",
                    param=param,
                    code="prompt_too_long",
                )
    if messages is not None:
        if len(messages) > settings.max_messages_per_request:
            raise InvalidInput(
                f"messages: {len(messages)} messages; the limit is {settings.max_messages_per_request} per request "
                "(TUNESERVE_MAX_MESSAGES_PER_REQUEST)",
                param="messages",
                code="too_many_messages",
            )
        total = sum(len(content) for content in messages)
        if total > limit:
            raise InvalidInput(
                f"messages: {total} characters of content in all; the limit is {limit} (TUNESERVE_MAX_PROMPT_CHARS)",
                param="messages",
                code="prompt_too_long",
            )


def serving_request(body: GenerateRequest, adapter: str | None) -> ServingRequest:
    return ServingRequest(adapter=adapter, **body.model_dump())


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def sse_events(
    chunks: AsyncIterator[GenerateChunk], encode: Callable[[GenerateChunk], list[str]]
) -> AsyncIterator[str]:
    """Server-sent events from serving's chunks; an error after the first event goes into the stream."""
    try:
        async for chunk in chunks:
            for data in encode(chunk):
                yield sse(data)
    except ServingStreamError as e:
        yield sse(json.dumps({"error": e.error}))
    yield sse("[DONE]")


@contextmanager
def _adapter_param_named(param: str) -> Iterator[None]:
    """Serving names the adapter field `adapter`; the OpenAI routes call it `model`."""
    try:
        yield
    except TuneserveError as e:
        if e.param == "adapter":
            e.param = param
        raise


async def generate(client: ServingClient, request: ServingRequest, *, param: str = "adapter") -> GenerateResult:
    with _adapter_param_named(param):
        return await client.generate(request)


async def generate_stream(
    client: ServingClient, request: ServingRequest, *, param: str = "adapter"
) -> AsyncIterator[GenerateChunk]:
    """Open the stream now, so a bad adapter or prompt is a plain 4xx, not an event in a 200 stream."""
    with _adapter_param_named(param):
        return await client.stream(request)


def servable_models(session: Session, settings: Settings, tenant_id: str) -> tuple[str, list[Adapter]]:
    return settings.served_model_name, adapters_repo.list_servable_adapters(session, tenant_id)
