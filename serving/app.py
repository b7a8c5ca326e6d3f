"""The serving process's internal HTTP app: only the API talks to it (loopback or an internal network)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.errors import install_error_handlers
from core.errors import ServiceUnavailable, TuneserveError
from core.settings import Settings
from serving import metrics
from serving.adapters import AdapterRegistry
from serving.engine import Generation, build_engine
from serving.protocol import TOKEN_HEADER, AdapterUnloaded, GenerateResult, ServingRequest

log = logging.getLogger(__name__)


class Unauthorized(TuneserveError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_serving_token"


def check_bind_address(settings: Settings) -> None:
    """Serving has no user auth: off loopback it needs the shared token, so only the API can call it."""
    host = settings.serving_host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not settings.serving_token:
        raise ValueError(f"serving binds {host!r} beyond loopback: set TUNESERVE_SERVING_TOKEN")


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def create_app(settings: Settings, engine: Any = None) -> FastAPI:
    """The app; it builds the engine at startup unless one is given (the port opens once the engine is up)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from transformers import AutoTokenizer

        eng = engine if engine is not None else build_engine(settings)
        tokenizer = AutoTokenizer.from_pretrained(settings.base_model, trust_remote_code=False)
        registry = AdapterRegistry(settings, eng.add_lora, eng.remove_lora)
        app.state.generation = Generation(settings, eng, tokenizer, registry)
        metrics.track_adapters_loaded(lambda: len(registry.loaded_names))
        log.info("serving %s on %s", settings.served_model_name, settings.serving_url)
        try:
            yield
        finally:
            if engine is None:
                eng.shutdown()

    def check_token(request: Request) -> None:
        if settings.serving_token and not hmac.compare_digest(
            request.headers.get(TOKEN_HEADER, ""), settings.serving_token
        ):
            raise Unauthorized("missing or wrong serving token")

    app = FastAPI(title="tuneserve-serving", lifespan=lifespan, dependencies=[Depends(check_token)])
    install_error_handlers(app)
    metrics.install(app)

    def generation(request: Request) -> Generation:
        return request.app.state.generation

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Readiness: the port is open only after the engine started; 503 once the engine died."""
        gen = generation(request)
        if gen.engine.errored:
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return JSONResponse(
            {"status": "ok", "model": settings.served_model_name, "adapters": gen.adapters.loaded_names}
        )

    @app.post("/generate", response_model=GenerateResult)
    async def generate(body: ServingRequest, request: Request) -> Any:
        gen = generation(request)
        prepared = await gen.prepare(body)
        if not body.stream:
            return await _guard_engine(gen, gen.complete(prepared))

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in gen.stream(prepared):
                    yield sse(chunk.model_dump_json())
            except Exception as e:
                log.exception("stream %s failed", prepared.request_id)
                error: TuneserveError = ServiceUnavailable("generation failed in the engine", code="engine_error")
                if isinstance(e, TuneserveError):
                    error = e
                yield sse(json.dumps(error.to_dict()))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/adapters/{name}/unload", response_model=AdapterUnloaded)
    async def unload(name: str, request: Request) -> AdapterUnloaded:
        return AdapterUnloaded(name=name, unloaded=await generation(request).adapters.unload(name))

    return app


async def _guard_engine(gen: Generation, work: Any) -> Any:
    """An engine failure is a 503 (the engine may be dead or restarting), not a 500."""
    try:
        return await work
    except TuneserveError:
        raise
    except Exception as e:
        log.exception("generation failed in the engine")
        gen.check_alive()
        raise ServiceUnavailable("generation failed in the engine", code="engine_error") from e
