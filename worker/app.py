"""Celery entrypoint: `celery -A worker.app worker --pool=solo --concurrency=1 -Q <queue>`."""

from __future__ import annotations

from core.queue import celery_for
from core.settings import get_settings

settings = get_settings()
settings.ensure_dirs()
app = celery_for(settings)

import worker.tasks  # noqa: E402,F401  (registers the tasks on app)
