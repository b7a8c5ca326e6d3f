"""Readiness: can we reach the database and the broker right now.

The answer is reused for `metrics_cache_seconds` (per app), and one computation at a time runs however many
probes arrive together: a flood of /readyz (or a database that hangs) cannot pile up connections.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import text

from core.db import get_engine
from core.queue import celery_for
from core.settings import Settings

T = TypeVar("T")


class Cached(Generic[T]):
    """A value computed at most once per ttl seconds; callers that arrive during a computation wait for it and share
    its result (single flight), instead of each starting their own."""

    def __init__(self, compute: Callable[[], T], ttl: Callable[[], float]) -> None:
        self._compute = compute
        self._ttl = ttl
        self._lock = threading.Lock()
        self._value: T | None = None
        self._expires = 0.0

    def get(self) -> T:
        with self._lock:
            if self._value is not None and time.monotonic() < self._expires:
                return self._value
            value = self._compute()
            self._value, self._expires = value, time.monotonic() + self._ttl()
            return value


def readiness_checks(settings: Settings) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means not ready; the message says which
        checks["database"] = f"error: {type(e).__name__}"
    try:
        with celery_for(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["broker"] = f"error: {type(e).__name__}"
    return checks


_make_lock = threading.Lock()


def cached_readiness(app_state: Any, settings: Settings) -> dict[str, str]:
    """readiness_checks, reused for settings.metrics_cache_seconds (one cache per app)."""
    cache = getattr(app_state, "readiness_cache", None)
    if cache is None:
        with _make_lock:
            cache = getattr(app_state, "readiness_cache", None)
            if cache is None:
                cache = app_state.readiness_cache = Cached(
                    lambda: readiness_checks(settings), lambda: settings.metrics_cache_seconds
                )
    return cache.get()  # type: ignore[no-any-return]
