"""The API's HTTP client for the serving process; serving down or starting is a 503 with Retry-After."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request

from core.errors import ServiceUnavailable, TuneserveError
from core.settings import Settings
from serving.protocol import TOKEN_HEADER, GenerateChunk, GenerateResult, ServingRequest

log = logging.getLogger(__name__)


class ServingStreamError(Exception):
    """An error event inside a stream whose 200 status line was already sent."""

    def __init__(self, error: dict[str, object]) -> None:
        super().__init__(str(error.get("message")))
        self.error = error


class ServingClient:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._retry_after = settings.serving_retry_after_seconds
        headers = {"Content-Type": "application/json"}
        if settings.serving_token:
            headers[TOKEN_HEADER] = settings.serving_token
        self._http = httpx.AsyncClient(
            base_url=settings.serving_url,
            headers=headers,
            timeout=httpx.Timeout(settings.serving_timeout_seconds, connect=5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _unavailable(self, detail: str) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the serving engine is not available ({detail}); retry shortly", retry_after=self._retry_after
        )

    def _error(self, response: httpx.Response) -> TuneserveError:
        """Serving's error, re-raised with its status, code and param (5xx: a 503 to the client)."""
        try:
            body = response.json()["error"]
            message, code, param, type_ = body["message"], body["code"], body.get("param"), body["type"]
        except (ValueError, KeyError, TypeError):
            message, code, param, type_ = f"serving answered {response.status_code}", None, None, None
        if response.status_code >= 500:
            log.warning("serving answered %s: %s", response.status_code, message)
            return self._unavailable(message)
        error = TuneserveError(message, param=param, code=code)
        error.status_code = response.status_code
        if type_:
            error.type = type_
        return error

    async def generate(self, body: ServingRequest) -> GenerateResult:
        try:
            response = await self._http.post("/generate", content=body.model_dump_json(exclude_none=True))
        except httpx.TransportError as e:
            raise self._unavailable(type(e).__name__) from e
        if response.status_code != 200:
            raise self._error(response)
        return GenerateResult.model_validate_json(response.content)

    async def stream(self, body: ServingRequest) -> AsyncIterator[GenerateChunk]:
        """Open the stream (errors before the first event raise here), then iterate its chunks."""
        request = self._http.build_request("POST", "/generate", content=body.model_dump_json(exclude_none=True))
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as e:
            raise self._unavailable(type(e).__name__) from e
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            raise self._error(response)
        return self._chunks(response)

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[GenerateChunk]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                parsed = json.loads(data)
                if "error" in parsed:
                    raise ServingStreamError(parsed["error"])
                yield GenerateChunk.model_validate(parsed)
            raise ServingStreamError(self._unavailable("the stream ended early").to_dict()["error"])  # type: ignore[arg-type]
        except httpx.TransportError as e:
            raise ServingStreamError(self._unavailable(type(e).__name__).to_dict()["error"]) from e  # type: ignore[arg-type]
        finally:
            await response.aclose()

    async def unload(self, name: str) -> bool:
        """Ask serving to drop a deleted adapter; False when serving could not be told (it checks SQL anyway)."""
        try:
            response = await self._http.post(f"/adapters/{name}/unload")
        except httpx.TransportError:
            return False
        return response.status_code == 200


async def get_serving_client(request: Request) -> ServingClient:
    """One client (and connection pool) per app, made on first use (async: no thread-pool hop per request)."""
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
