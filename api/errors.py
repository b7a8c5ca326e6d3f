"""One error shape for every error: {"error": {"type", "code", "message", "param"}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from core.errors import RetryLater, TuneserveError, Unauthenticated

log = logging.getLogger(__name__)


# The member tags pydantic puts in an error's loc when a union fails (`str`, `constrained-str`, `list[TextPart]`):
# the client named a field, not a type.
_UNION_TAG = re.compile(r"^(?:str|int|float|bool|bytes|constrained-(?:str|int|float|bytes)|[a-z-]+\[.*\])$")


def _param_of(loc: tuple[object, ...]) -> str | None:
    parts = [
        p
        for p in loc
        if p not in ("body", "query", "path", "form", "header") and not (isinstance(p, str) and _UNION_TAG.match(p))
    ]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _most_telling(errors: Sequence[Any]) -> Any:
    """The error to report: the first, except that a value fitting no member of a union fails each member, and the
    first member's "not a string" says less than another member's "at most 1000000 characters"."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    tag_at = next((i for i, p in enumerate(loc) if isinstance(p, str) and _UNION_TAG.match(p)), None)
    if tag_at is None or not str(first.get("type", "")).endswith("_type"):
        return first
    return next(
        (
            e
            for e in errors
            if tuple(e.get("loc", ()))[:tag_at] == loc[:tag_at] and not str(e.get("type", "")).endswith("_type")
        ),
        first,
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method the request's path answers to.

    Starlette's own 405 lists only the first route whose path matched, and GET /jobs and POST /jobs
    are two routes.
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def _body(type_: str, code: str, message: str, param: str | None) -> dict[str, object]:
    return {"error": {"type": type_, "code": code, "message": message, "param": param}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneserveError)
    async def _tuneserve(_: Request, exc: TuneserveError) -> JSONResponse:
        headers = None
        if isinstance(exc, RetryLater):
            headers = {"Retry-After": str(exc.retry_after)}
        elif isinstance(exc, Unauthenticated):
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # api/routing.py: not JSON, NaN/Infinity, or nested too deeply
            error = (first.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse(
                _body("invalid_request_error", "invalid_json", f"the request body is not valid JSON: {error}", "body"),
                status_code=422,
            )
        first = _most_telling(exc.errors())
        param = _param_of(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(_body("invalid_request_error", "invalid_value", message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return JSONResponse(
            _body("invalid_request_error", code, str(exc.detail), None), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, _exc: Exception) -> JSONResponse:
        # A 500 is a bug: log it whole, tell the client nothing internal.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(_body("server_error", "internal_error", "internal server error", None), status_code=500)
