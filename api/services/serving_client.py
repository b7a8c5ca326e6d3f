"""The API's HTTP client for the serving replicas (vLLM's OpenAI servers behind tuneserve's guard).

Replica choice is rendezvous (highest-random-weight) hashing on the adapter name: each adapter has its own order of
replicas, so it stays hot in one engine's LoRA cache while that replica is up, and when the replica does not answer
the next one in *its* order takes it (the other adapters keep their replicas). The base model has no affinity and
spreads over all replicas. A replica that failed is tried last for `serving_retry_after_seconds`; the client gets a
503 with Retry-After only when no replica answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request

from core.errors import ServiceUnavailable, TuneserveError
from core.serving_contract import NOT_SERVABLE_PREFIX, TOKEN_HEADER, UNLOAD_LORA_PATH, serving_token
from core.settings import Settings

log = logging.getLogger(__name__)

# vLLM's status -> tuneserve's error type and code (the message and param come from vLLM).
_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
# How vLLM says that a resolved adapter failed to load in the engine (OpenAIServingModels.resolve_lora).
ENGINE_REFUSED = "was found but could not be loaded"
# vLLM appends the parameter to a validation error's text; ours carries it in `param` already.
_PARAMETER_SUFFIX = re.compile(r" \(parameter=model\)$")
_CODES = {400: "invalid_request", 404: "not_found", 422: "invalid_value", 429: "rate_limited"}


@dataclass
class Replica:
    url: str
    http: httpx.AsyncClient
    failed_until: float = field(default=0.0)


def replica_order(urls: list[str], key: str | None) -> list[str]:
    """The rendezvous order of `urls` for an adapter name (deterministic), or a random order for the base model."""
    if key is None:
        return random.sample(urls, len(urls))
    return sorted(urls, key=lambda url: hashlib.sha256(f"{key}\0{url}".encode()).digest(), reverse=True)


def serving_error(status: int, body: bytes | dict[str, Any]) -> TuneserveError:
    """vLLM's (or the guard's) error body as tuneserve's error, with the same status; 5xx becomes the caller's job."""
    try:
        parsed = json.loads(body) if isinstance(body, bytes) else body
        error = parsed["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = f"serving answered {status}", None
    code = _CODES.get(status, "serving_error")
    if message.startswith(NOT_SERVABLE_PREFIX):  # refused by the registry resolver before loading
        status, code, param = 422, "adapter_not_servable", "model"
        message = _PARAMETER_SUFFIX.sub("", message[len(NOT_SERVABLE_PREFIX) :])
    elif ENGINE_REFUSED in message:  # verified, then refused by the engine itself
        status, code, param = 422, "adapter_not_servable", "model"
    out = TuneserveError(message, param=param if isinstance(param, str) else None, code=code)
    out.status_code = status
    out.type = _TYPES.get(status, "invalid_request_error")
    return out


class Unanswered(Exception):
    """A replica that did not answer (connection refused or dropped, or a 5xx): the next one may."""


class ServingClient:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._retry_after = settings.serving_retry_after_seconds
        # Always a token (TUNESERVE_SERVING_TOKEN, or data_dir's shared with serving): a ValueError at start without one.
        headers = {"Content-Type": "application/json", TOKEN_HEADER: serving_token(settings)}
        self.replicas = [
            Replica(
                url=url,
                http=httpx.AsyncClient(
                    base_url=url,
                    headers=headers,
                    timeout=httpx.Timeout(settings.serving_timeout_seconds, connect=5.0),
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                    transport=transport,
                ),
            )
            for url in settings.serving_url_list
        ]
        self._by_url = {r.url: r for r in self.replicas}

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.http.aclose()

    def unavailable(self, detail: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the serving engine is not available ({detail}); retry shortly", retry_after=self._retry_after
        )

    def order(self, affinity: str | None) -> list[Replica]:
        """Replicas to try, in order: the adapter's rendezvous order, those that failed lately moved to the end."""
        now = time.monotonic()
        ranked = [self._by_url[url] for url in replica_order(list(self._by_url), affinity)]
        return [r for r in ranked if r.failed_until <= now] + [r for r in ranked if r.failed_until > now]

    def _failed(self, replica: Replica, why: str) -> None:
        log.warning("serving replica %s did not answer: %s", replica.url, why)
        replica.failed_until = time.monotonic() + self._retry_after

    async def _send(self, replica: Replica, path: str, body: bytes, *, stream: bool) -> httpx.Response:
        """One replica's response (a stream left open when `stream`); Unanswered when the next replica should try."""
        request = replica.http.build_request("POST", path, content=body)
        try:
            response = await replica.http.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as e:
            self._failed(replica, type(e).__name__)
            raise Unanswered(type(e).__name__) from e
        except httpx.TransportError as e:  # e.g. a read timeout: the request may still be running there
            raise self.unavailable(type(e).__name__) from e
        if response.status_code >= 500:
            await response.aread()
            await response.aclose()
            self._failed(replica, f"status {response.status_code}")
            raise Unanswered(f"status {response.status_code}")
        return response

    async def _first_answer(self, path: str, body: bytes, affinity: str | None, *, stream: bool) -> httpx.Response:
        last = "no serving replica is configured"
        for replica in self.order(affinity):
            try:
                return await self._send(replica, path, body, stream=stream)
            except Unanswered as e:
                last = str(e)
        raise self.unavailable(last)

    async def post(self, path: str, body: dict[str, Any], *, affinity: str | None) -> dict[str, Any]:
        """A finished (non-streamed) answer as JSON; an error answer raises it as tuneserve's error."""
        response = await self._first_answer(path, json.dumps(body).encode(), affinity, stream=False)
        if response.status_code != 200:
            raise serving_error(response.status_code, response.content)
        result: dict[str, Any] = response.json()
        return result

    async def stream(self, path: str, body: dict[str, Any], *, affinity: str | None) -> AsyncIterator[str]:
        """Open a streamed answer (errors before its first event raise here), then iterate its SSE lines."""
        response = await self._first_answer(path, json.dumps(body).encode(), affinity, stream=True)
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            raise serving_error(response.status_code, response.content)
        return self._lines(response)

    async def _lines(self, response: httpx.Response) -> AsyncIterator[str]:
        """The stream's lines; closing this iterator (a client that went away) closes the connection, and vLLM
        aborts the generation when its client disconnects."""
        try:
            async for line in response.aiter_lines():
                yield line
        except httpx.TransportError as e:
            error = self.unavailable(f"the stream broke off: {type(e).__name__}")
            yield f"data: {json.dumps(error.to_dict())}"
            yield "data: [DONE]"
        finally:
            await response.aclose()

    async def unload(self, name: str) -> bool:
        """Drop a deleted adapter from every replica; False when one could not be told (the API refuses it anyway)."""
        told = True
        for replica in self.replicas:
            try:
                response = await replica.http.post(UNLOAD_LORA_PATH, json={"lora_name": name})
            except httpx.TransportError:
                told = False
                continue
            # vLLM answers 400/404 for a name it never loaded: nothing to drop there.
            told = told and response.status_code < 500
        return told


async def get_serving_client(request: Request) -> ServingClient:
    """One client (and connection pool per replica) per app, made on first use."""
    state = request.app.state
    client: ServingClient | None = getattr(state, "serving_client", None)
    if client is None:
        client = state.serving_client = ServingClient(state.settings)
    return client


async def close_serving_client(state: Any) -> None:
    client: ServingClient | None = getattr(state, "serving_client", None)
    if client is not None:
        # Forget it too: an app whose lifespan starts again (a second TestClient) must make a new one.
        state.serving_client = None
        await client.aclose()
