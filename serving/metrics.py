"""Prometheus metrics of the serving process: tokens generated, throughput, adapters loaded, load failures.

Serving is one process with one engine, so the metrics live on one module-level registry. The serving
app calls the `record_*` functions and mounts `GET /metrics` with `install(app)` (behind the same
serving token as every other serving route: scrape it with that header, from the internal network).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BASE_MODEL_LABEL = "<base>"  # the adapter label of requests without an adapter
THROUGHPUT_WINDOW_SECONDS = 60.0

REGISTRY = CollectorRegistry()

GENERATED_TOKENS = Counter(
    "tuneserve_serving_generated_tokens", "Completion tokens generated, by adapter", ["adapter"], registry=REGISTRY
)
PROMPT_TOKENS = Counter(
    "tuneserve_serving_prompt_tokens", "Prompt tokens processed, by adapter", ["adapter"], registry=REGISTRY
)
REQUESTS = Counter(
    "tuneserve_serving_requests",
    "Generation requests finished, by adapter and outcome",
    ["adapter", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "tuneserve_serving_request_duration_seconds",
    "Time from a request's arrival in the engine to its last token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    registry=REGISTRY,
)
TOKENS_PER_SECOND = Gauge(
    "tuneserve_serving_tokens_per_second",
    f"Completion tokens per second over the last {THROUGHPUT_WINDOW_SECONDS:.0f} s (all requests together)",
    registry=REGISTRY,
)
ADAPTERS_LOADED = Gauge("tuneserve_serving_adapters_loaded", "Adapters loaded in the engine now", registry=REGISTRY)
ADAPTER_LOADS = Counter(
    "tuneserve_serving_adapter_loads", "Adapters loaded into the engine (cache misses)", registry=REGISTRY
)
ADAPTER_LOAD_FAILURES = Counter(
    "tuneserve_serving_adapter_load_failures",
    "Adapters that could not be loaded, by reason",
    ["reason"],
    registry=REGISTRY,
)
ADAPTER_LOAD_SECONDS = Histogram(
    "tuneserve_serving_adapter_load_seconds",
    "Time to verify and load one adapter",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)


class ThroughputWindow:
    """Tokens finished in the last `window` seconds, divided by the window: a rate that decays to 0 when idle."""

    def __init__(self, window: float = THROUGHPUT_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._events.append((self.clock(), tokens))
            self._trim()

    def rate(self) -> float:
        with self._lock:
            self._trim()
            return sum(n for _, n in self._events) / self.window

    def _trim(self) -> None:
        cutoff = self.clock() - self.window
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()


_throughput = ThroughputWindow()
TOKENS_PER_SECOND.set_function(_throughput.rate)


def _adapter_label(adapter: str | None) -> str:
    return adapter or BASE_MODEL_LABEL


def record_generation(
    adapter: str | None, *, prompt_tokens: int, completion_tokens: int, seconds: float, outcome: str = "ok"
) -> None:
    """One finished request (streamed or not); `outcome` is a short fixed word: ok, aborted, error."""
    label = _adapter_label(adapter)
    PROMPT_TOKENS.labels(label).inc(prompt_tokens)
    GENERATED_TOKENS.labels(label).inc(completion_tokens)
    REQUESTS.labels(label, outcome).inc()
    REQUEST_SECONDS.observe(seconds)
    _throughput.add(completion_tokens)


def record_adapter_loaded(seconds: float) -> None:
    """An adapter was verified and loaded into the engine."""
    ADAPTER_LOADS.inc()
    ADAPTER_LOAD_SECONDS.observe(seconds)


def record_adapter_load_failure(reason: str) -> None:
    """An adapter could not be loaded; `reason` is a short fixed code (e.g. checksum, shape, config, engine)."""
    ADAPTER_LOAD_FAILURES.labels(reason).inc()


def set_adapters_loaded(count: int) -> None:
    """How many adapters the engine holds now."""
    ADAPTERS_LOADED.set(count)


def track_adapters_loaded(count: Callable[[], int]) -> None:
    """Read the number of loaded adapters at each scrape instead (e.g. `lambda: len(registry.loaded_names())`)."""
    ADAPTERS_LOADED.set_function(lambda: float(count()))


def render() -> tuple[bytes, str]:
    """The registry in Prometheus text format, with its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def install(app: FastAPI) -> None:
    """Add `GET /metrics` to the serving app (the app's own dependencies, e.g. the serving token, apply)."""

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        body, content_type = render()
        return Response(body, media_type=content_type)
