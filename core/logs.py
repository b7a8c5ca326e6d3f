"""The one logging setup of tuneserve's own processes: the API (`tuneserve-api`), serving, and the worker's
training, evaluation and adapter-operation children. Celery's worker process keeps Celery's own setup."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Root logger at `level`, one line per record on stderr (a no-op if the process configured logging already)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
