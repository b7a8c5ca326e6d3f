"""One error shape for every error: {"error": {"type", "code", "message", "param"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from core.errors import RetryLater, TuneserveError, Unauthenticated

log = logging.getLogger(__name__)


def _param_of(loc: tuple[object, ...]) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "form", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


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
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A 500 is a bug: log it whole, tell the client nothing internal.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(_body("server_error", "internal_error", "internal server error", None), status_code=500)
