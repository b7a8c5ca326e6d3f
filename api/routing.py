"""Strict JSON request bodies for every route: RFC 8259 JSON only.

Python's json module accepts `NaN`, `Infinity` and `-Infinity` and gives up with a RecursionError on deeply
nested input (core/strict_json.py). Every router of the API uses StrictJSONRoute, so a body with either is a
422 naming the problem, in the one error shape, before any field is validated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from core import strict_json


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = strict_json.loads(body)
            except UnicodeDecodeError as e:
                raise json.JSONDecodeError(f"the body is not UTF-8: {e.reason}", "", 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose handler sees a StrictJSONRequest (FastAPI's documented custom-request pattern)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
