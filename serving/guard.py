"""Serving's front door inside vLLM's OpenAI server (added with `--middleware serving.guard.ServingGuard`).

Serving has no users of its own: only the API calls it, over loopback or an internal network. Every path needs the
serving token (our header, or `Authorization: Bearer` for a Prometheus scrape; /metrics too, since vLLM's metrics
name every tenant's adapters). There is always a token: TUNESERVE_SERVING_TOKEN, or the one generated per deployment
in data_dir (core.serving_contract.serving_token). Scopes other than http and lifespan (WebSocket: vLLM has realtime
endpoints) are closed before vLLM sees them. vLLM's runtime load-by-path
endpoint is refused outright, token or not: an adapter reaches the engine only through the registry resolver,
verified. Only the paths in SERVING_PATHS are answered at all (vLLM's server has many more). Refusals use tuneserve's error shape.
"""

from __future__ import annotations

import hmac
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import NotFound, TuneserveError, Unauthenticated
from core.serving_contract import SERVING_PATHS, TOKEN_HEADER, serving_token
from core.settings import get_settings


def _error(error: TuneserveError) -> tuple[int, bytes]:
    """tuneserve's one error shape (core/errors.py), as the API renders it too."""
    return error.status_code, json.dumps(error.to_dict()).encode()


class ServingGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.token = serving_token(get_settings())
        if not self.token:  # serving_token never returns one empty; a guard that lets all through must not exist
            raise ValueError("serving has no token")

    def _authorized(self, headers: Headers) -> bool:
        given = headers.get(TOKEN_HEADER)
        if given is None:
            scheme, _, param = headers.get("authorization", "").partition(" ")
            given = param if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a WebSocket (or any future scope): closed, never passed on
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        refusal = None
        if not self._authorized(Headers(scope=scope)):
            refusal = _error(Unauthenticated("missing or wrong serving token", code="invalid_serving_token"))
        elif scope["path"] not in SERVING_PATHS:
            refusal = _error(NotFound("not a serving path (adapters load from the registry)"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, body = refusal
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
