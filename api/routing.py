"""Strict JSON request bodies for every route: RFC 8259 JSON only.

Python's json module accepts `NaN`, `Infinity` and `-Infinity` and gives up with a RecursionError on deeply
nested input (core/strict_json.py); a `\u0000` in a string would reach Postgres, whose text cannot hold it. Every
router of the API uses StrictJSONRoute, so a body with any of them is a 422 naming the problem, in the one error
shape, before any field is validated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from core import strict_json

# A \u0000 escape (an odd number of backslashes before u0000): no string the API stores or looks up may hold NUL,
# since Postgres text cannot (it would be the database's error, a 500, deep inside a query).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                raise json.JSONDecodeError(f"the body is not UTF-8: {e.reason}", "", 0) from None
            if match := _NUL_ESCAPE.search(text):
                raise json.JSONDecodeError("NUL (\\u0000) is not accepted in strings", text, match.end() - 6)
            self._json = strict_json.loads(text)
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose handler sees a StrictJSONRequest (FastAPI's documented custom-request pattern)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
