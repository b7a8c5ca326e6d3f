"""Generation for the API: a thin, tenant-checked pass-through to vLLM's OpenAI server on a serving replica.

The API checks what only it can check, then forwards the body and relays the answer (or the stream) unchanged:
- the key (the route's TenantDep) and that `model` is the base model or one of the tenant's ready adapters (SQL,
  in a transaction that ends before serving is called: no connection is held while a generation runs);
- its own limits, each a setting named in the 422/429: characters of prompts and messages, prompts in a list,
  messages, `n`, `max_tokens`, and a per-tenant count of generations running at once.
vLLM validates everything else (sampling knobs, logprobs, response_format, tools) and its errors come back in the
one error shape (serving_client.serving_error).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.services.serving_client import ServingClient, serving_error
from core.errors import InvalidInput, NotFound, RateLimited, TuneserveError
from core.models import Adapter, AdapterStatus
from core.repository import adapters as adapters_repo
from core.settings import Settings

T = TypeVar("T")

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

    Serving resolves names without a tenant, so this check is what keeps tenants apart: it runs first.
    """
    if name is None or settings.names_base_model(name):
        return None
    return await run_in_threadpool(_servable_adapter_name, session, tenant_id, name, param=param)


def _servable_adapter_name(session: Session, tenant_id: str, name: str, *, param: str) -> str:
    """The lookup and the end of its transaction in one trip to the thread pool: the connection goes back to the
    pool before the route waits on serving, which may take minutes."""
    try:
        if name.startswith("ft:"):  # an OpenAI fine-tuned model name: the tenant's job's adapter
            from api.services.openai_fine_tuning import adapter_of_model

            name = adapter_of_model(session, tenant_id, name, param=param)
        return _servable_adapter(session, tenant_id, name, param=param).name
    finally:
        session.commit()


def _content_chars(content: Any) -> int:
    """Characters of a chat message's text: a string, or the `text` of its parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def check_prompt_size(
    settings: Settings, *, prompts: list[Any] | None = None, messages: list[Any] | None = None
) -> None:
    """Refuse prompts (or a chat) past the deployment's limits before anything is tokenized or forwarded: 422 naming
    the field and the setting. Each text prompt counts alone; chat messages' text counts together."""
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
            if isinstance(prompt, str) and len(prompt) > limit:
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
        total = sum(_content_chars(m.get("content") if isinstance(m, dict) else None) for m in messages)
        if total > limit:
            raise InvalidInput(
                f"messages: {total} characters of content in all; the limit is {limit} (TUNESERVE_MAX_PROMPT_CHARS)",
                param="messages",
                code="prompt_too_long",
            )


def check_generation_limits(settings: Settings, body: dict[str, Any]) -> None:
    """`n` and the token budget against the deployment's settings; the rest is vLLM's to validate (the fields
    themselves pass the allowlists of api/generation_schemas.py first)."""
    n = body.get("n")
    if isinstance(n, int) and n > settings.max_choices_per_request:
        raise InvalidInput(
            f"n: {n} choices; the limit is {settings.max_choices_per_request} (TUNESERVE_MAX_CHOICES_PER_REQUEST)",
            param="n",
            code="too_many_choices",
        )
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and value > settings.serving_max_tokens:
            raise InvalidInput(
                f"{field} must be at most {settings.serving_max_tokens} (TUNESERVE_SERVING_MAX_TOKENS)",
                param=field,
                code="max_tokens_too_large",
            )


class GenerationSlots:
    """Generations running now, per tenant, in this API process: past the limit a new one is a 429.

    One event loop runs every request of the process, so plain counting is exact. The limit is per API process;
    with several API replicas a tenant can have that many on each.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running: dict[str, int] = {}

    def acquire(self, tenant_id: str) -> Callable[[], None]:
        count = self.running.get(tenant_id, 0)
        if count >= self.limit:
            raise RateLimited(
                f"{count} generations of this tenant are running; the limit is {self.limit} at once "
                "(TUNESERVE_MAX_CONCURRENT_GENERATIONS_PER_TENANT)",
                retry_after=1,
                code="too_many_concurrent_generations",
            )
        self.running[tenant_id] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self.running[tenant_id] - 1
                if left:
                    self.running[tenant_id] = left
                else:
                    del self.running[tenant_id]

        return release


def generation_slots(app_state: Any, settings: Settings) -> GenerationSlots:
    slots: GenerationSlots | None = getattr(app_state, "generation_slots", None)
    if slots is None:
        slots = app_state.generation_slots = GenerationSlots(settings.max_concurrent_generations_per_tenant)
    return slots


class ClientGone(TuneserveError):
    """The client hung up before its answer began; nobody reads this error (nginx's 499)."""

    status_code = 499
    code = "client_closed_request"


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work` (a call to serving), cancelled when the client disconnects first: the connection to serving closes
    and vLLM aborts the generation, as it does for its own clients. (Once a stream has begun, Starlette's
    StreamingResponse notices the disconnect itself and closes the relay, with the same effect.)"""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    raise ClientGone("the client disconnected before the answer began")


@contextmanager
def _params_renamed(rename: dict[str, str]) -> Iterator[None]:
    """vLLM's param names as the client's request has them: /generate calls `model` `adapter`, and a prompt past
    the context (vLLM's `input_tokens`) is the `prompt` or the `messages` the client sent."""
    try:
        yield
    except TuneserveError as e:
        if e.param in rename:
            e.param = rename[e.param]
        raise


async def complete(
    request: Request, serving: ServingClient, slots: GenerationSlots, tenant_id: str, path: str,
    body: dict[str, Any], *, adapter: str | None, rename: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    release = slots.acquire(tenant_id)
    try:
        with _params_renamed(rename):
            return await unless_client_leaves(request, serving.post(path, body, affinity=adapter))
    finally:
        release()


async def open_stream(
    request: Request, serving: ServingClient, slots: GenerationSlots, tenant_id: str, path: str,
    body: dict[str, Any], *, adapter: str | None, rename: dict[str, str],
) -> AsyncIterator[str]:  # fmt: skip
    """Open the stream now, so a bad adapter or prompt is a plain 4xx, not an event in a 200 stream; the tenant's
    slot is held until the stream ends or its client goes away."""
    release = slots.acquire(tenant_id)
    try:
        with _params_renamed(rename):
            lines = await unless_client_leaves(request, serving.stream(path, body, affinity=adapter))
    except BaseException:
        release()
        raise
    return _released_at_end(lines, release)


async def _released_at_end(lines: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for line in lines:
            yield line
    finally:
        release()
        await lines.aclose()  # type: ignore[attr-defined]  # an async generator: closes the upstream connection


def error_event(data: str) -> str | None:
    """An error event of vLLM's stream, in tuneserve's error shape (None for any other event)."""
    if not data.startswith('{"error"'):
        return None
    try:
        error = json.loads(data)["error"]
        status = int(error.get("code") or 500)
    except (ValueError, KeyError, TypeError):
        return None
    return json.dumps(serving_error(status if status < 500 else 503, {"error": error}).to_dict())


async def relay_sse(
    lines: AsyncIterator[str], rewrite: Callable[[str], str | None] | None = None
) -> AsyncIterator[str]:
    """vLLM's server-sent events as they come; error events in tuneserve's shape, other events through `rewrite`
    (None: unchanged; a rewrite returning None drops the event)."""
    async for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            yield "data: [DONE]\n\n"
            return
        out = error_event(data)
        if out is None:
            out = rewrite(data) if rewrite is not None else data
        if out is not None:
            yield f"data: {out}\n\n"
