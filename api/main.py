"""The FastAPI app: thin routes over the services in api/services and the repositories in core/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.metrics import install_metrics
from api.middleware import RequestGuard, SecurityHeaders
from api.routes import (
    adapters,
    dataset_rows,
    datasets,
    evaluations,
    events,
    generation,
    health,
    jobs,
    openai_compat,
    openai_files,
    openai_fine_tuning,
    openai_graders,
    openai_job_control,
    usage,
)
from api.schemas import ErrorResponse
from api.services.serving_client import close_serving_client
from api.ui import install_console, install_docs
from api.ui.assets import CONSOLE_PREFIX
from api.ui.docs import DOCS_URL, OAUTH2_REDIRECT_URL
from core.logs import setup_logging
from core.reconcile import ReconcilerThread
from core.serving_contract import is_loopback, serving_token
from core.settings import Settings, get_settings

# Every refusal has the one error shape (api/errors.py); the OpenAPI document says so for all 4xx,
# in place of FastAPI's default 422 body, which this API never sends.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": 'Refused: {"error": {"type", "code", "message", "param"}}'},
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    serving_token(settings)  # beyond loopback without TUNESERVE_SERVING_TOKEN (compose): fail now, saying so
    if not settings.auth_enabled and not is_loopback(settings.api_host):
        # With auth off anyone who reaches the port is every tenant at once: only this host may reach it.
        raise ValueError(
            f"TUNESERVE_AUTH_ENABLED=false needs a loopback TUNESERVE_API_HOST (127.0.0.1), not {settings.api_host!r}"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reconciler = ReconcilerThread(settings) if settings.reconcile_interval_seconds > 0 else None
        if reconciler:
            reconciler.start()
        yield
        if reconciler:
            reconciler.stop()
        await close_serving_client(app.state)

    app = FastAPI(
        title="tuneserve",
        version="0.1.0",
        description="Fine-tune LoRA adapters and serve them hot-swapped",
        lifespan=lifespan,
        # /docs is served by api/ui/docs.py from vendored files (FastAPI's loads them from CDNs); no ReDoc.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    # Authentication and the body cap, before routing and before any body is read (api/middleware.py); added
    # before the metrics middleware, which therefore wraps it and counts its 401s and 413s too.
    open_paths = (
        "/healthz",
        "/readyz",
        "/metrics",
        DOCS_URL,
        app.openapi_url,
        OAUTH2_REDIRECT_URL,
        CONSOLE_PREFIX,
    )
    # The console's pages and files hold no tenant data (the browser fetches that with the key): no key for them.
    open_prefixes = (CONSOLE_PREFIX,) if settings.console_enabled else ()
    app.add_middleware(
        RequestGuard, settings=settings, open_paths=[p for p in open_paths if p], open_prefixes=open_prefixes
    )
    install_metrics(app, settings)
    app.add_middleware(SecurityHeaders, console_prefix=CONSOLE_PREFIX)  # outermost: on every answer
    for router in (
        *(
            m.router
            for m in (
                health,
                datasets,
                dataset_rows,
                jobs,
                events,
                adapters,
                evaluations,
                generation,
                openai_compat,
                openai_files,
                openai_fine_tuning,
                openai_graders,
                openai_job_control,
                usage,
            )
        ),
        adapters.operations_router,
        openai_fine_tuning.models_router,
    ):
        app.include_router(router, responses=ERROR_RESPONSES)
    install_docs(app)
    if settings.console_enabled:
        install_console(app)
    return app


def run() -> None:
    """`tuneserve-api`: serve the app with uvicorn."""
    import uvicorn

    setup_logging()
    settings = get_settings()
    uvicorn.run("api.main:create_app", factory=True, host=settings.api_host, port=settings.api_port)
