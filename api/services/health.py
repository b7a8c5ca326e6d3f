"""Readiness: can we reach the database and the broker right now."""

from __future__ import annotations

from sqlalchemy import text

from core.db import get_engine
from core.queue import celery_for
from core.settings import Settings


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
