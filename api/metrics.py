"""Prometheus metrics of the API: requests by route template and status, jobs by status, broker queue depth.

Each app gets its own registry (tests build several apps in one process); `GET /metrics` renders it.
Jobs by status and the queue depth are read at scrape time (reused for metrics_cache_seconds), so every API
replica reports the same numbers: sum the request metrics across replicas, not these. With metrics_token set,
a scrape needs `Authorization: Bearer <metrics_token>`; without one, /metrics answers only on a loopback bind
(job counts are every tenant's together, and route counts show what others do).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.security.utils import get_authorization_scheme_param
from kombu.exceptions import ChannelError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.services.health import Cached
from core.db import session_scope
from core.errors import Forbidden, Unauthenticated
from core.queue import celery_for
from core.repository import jobs as jobs_repo
from core.serving_contract import is_loopback
from core.settings import Settings

log = logging.getLogger(__name__)

# Every label comes from a fixed set, so scanners cannot blow up the series count: requests that matched no route
# share one route label, and methods outside the standard ones (`curl -X FOO`) share one method label.
UNMATCHED_ROUTE = "<unmatched>"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class ApiMetrics:
    """The API's metric objects, on a registry of their own."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tuneserve_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tuneserve_http_request_duration_seconds",
            "Time to answer an HTTP request (whole body, streams included)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StateCollector(settings))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else OTHER_METHOD
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class StateSnapshot:
    """What a scrape reads from SQL and the broker (None: that source did not answer)."""

    job_counts: dict[str, int] | None
    queue_depth: int | None


class StateCollector(Collector):
    """Jobs by status (SQL) and the messages waiting in the broker queue, read at scrape time but at most once per
    metrics_cache_seconds: scrapes in between (or piled up behind a slow database) share one reading."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.snapshot = Cached(self.read, lambda: settings.metrics_cache_seconds)

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: registering must not query the database

    def read(self) -> StateSnapshot:
        counts: dict[str, int] | None = None
        try:
            with session_scope(self.settings.database_url) as session:
                counts = {status.value: n for status, n in jobs_repo.count_by_status(session).items()}
        except Exception as e:  # noqa: BLE001 - a scrape reports the source as down instead of failing whole
            # One line, not a traceback: scrapes repeat every few seconds while the database is down.
            log.warning("metrics: counting jobs failed: %s: %s", type(e).__name__, e)
        return StateSnapshot(job_counts=counts, queue_depth=queue_depth(self.settings))

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot.get()
        up = GaugeMetricFamily("tuneserve_metrics_source_up", "1 if the source answered this scrape", labels=["source"])
        if snapshot.job_counts is not None:
            jobs = GaugeMetricFamily("tuneserve_jobs", "Jobs by status (all jobs in the registry)", labels=["status"])
            for status, n in snapshot.job_counts.items():
                jobs.add_metric([status], n)
            yield jobs
        up.add_metric(["database"], 0 if snapshot.job_counts is None else 1)
        if snapshot.queue_depth is not None:
            queue = GaugeMetricFamily(
                "tuneserve_queue_depth", "Task messages waiting in the broker queue", labels=["queue"]
            )
            queue.add_metric([self.settings.queue_name], snapshot.queue_depth)
            yield queue
        up.add_metric(["broker"], 0 if snapshot.queue_depth is None else 1)
        yield up


def queue_depth(settings: Settings) -> int | None:
    """Messages waiting (not yet delivered) in the Celery queue; None if the broker cannot be asked.

    A passive declare returns the count on every kombu transport we deploy: Redis (LLEN over the
    queue's priority lists), Celery over SQL (visible rows of kombu_message) and AMQP. Redis drops a
    list once it is empty, which a passive declare reports as "not found": zero waiting.
    """
    try:
        with celery_for(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            try:
                return int(conn.default_channel.queue_declare(queue=settings.queue_name, passive=True).message_count)
            except ChannelError:
                return 0
    except Exception as e:  # noqa: BLE001 - broker down: the gauge is left out and source_up says why
        log.warning("metrics: reading the queue depth failed: %s: %s", type(e).__name__, e)
        return None


class MetricsMiddleware:
    """Times every HTTP request and counts it by route template (`/jobs/{job_id}`, not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before it starts a response
        start = time.perf_counter()

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            # The router writes the matched route into this same scope dict.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - start)


def check_metrics_token(authorization: str | None, token: str) -> None:
    """With metrics_token set, a scrape must send `Authorization: Bearer <metrics_token>` (401 otherwise)."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not credentials:
        raise Unauthenticated(
            "GET /metrics needs Authorization: Bearer <TUNESERVE_METRICS_TOKEN>",
            param="Authorization",
            code="missing_metrics_token",
        )
    if not hmac.compare_digest(credentials.encode(), token.encode()):
        raise Unauthenticated(
            "the metrics token is not valid (TUNESERVE_METRICS_TOKEN)",
            param="Authorization",
            code="invalid_metrics_token",
        )


def install_metrics(app: FastAPI, settings: Settings) -> ApiMetrics:
    """Add the timing middleware and `GET /metrics` (Prometheus text format) to the app."""
    metrics = ApiMetrics(settings)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(request: Request) -> Response:
        if settings.metrics_token:
            check_metrics_token(request.headers.get("Authorization"), settings.metrics_token)
        elif not is_loopback(settings.api_host):
            raise Forbidden(
                f"GET /metrics on a bind beyond loopback ({settings.api_host}) needs TUNESERVE_METRICS_TOKEN set, "
                "and then Authorization: Bearer <TUNESERVE_METRICS_TOKEN>",
                param="Authorization",
                code="metrics_token_required",
            )
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return metrics
