"""Where things are, and the services the tests talk to (overridable through the environment)."""

from __future__ import annotations

import os
from pathlib import Path

from core.statuses import TERMINAL_STATUSES

ROOT = Path(__file__).resolve().parent.parent.parent
PG_ADMIN_URL = os.environ.get("TUNESERVE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNESERVE_TEST_REDIS", "redis://127.0.0.1:6379/15")
TERMINAL = TERMINAL_STATUSES
# The console script docker-compose.yml runs as the api service; tests/test_cli.py starts it, and
# tests/test_compose.py checks both.
API_SCRIPT = "tuneserve-api"
