"""Browser tests of the web console (/ui) and /docs: a real headless Chromium against the API as a real server.

The cheap tests share one `console_stack`: the embedded SQLite deployment with the API under uvicorn and no worker
(jobs stay queued; nothing trains). The end-to-end test (test_console_e2e.py) uses the session's serving stack,
with a worker, to train, evaluate and chat for real.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.migrate import upgrade
from core.settings import Settings
from tests.support.browser import api_server, chromium, chromium_path
from tests.support.markers import requires
from tests.support.stack import mint_api_key, stack_settings

# .ci/run sets this: there a missing browser is a failure, not a skip.
REQUIRE_BROWSER = os.environ.get("TUNESERVE_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="session")
@requires("slow")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (never `playwright install`): one per session."""
    executable = chromium_path()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        executable = None
    if executable is None:
        reason = "needs the system chromium (apt-get install -y chromium) and playwright (pip install -e '.[dev]')"
        if REQUIRE_BROWSER:
            pytest.fail(reason)
        pytest.skip(reason)
    with chromium(executable) as b:
        yield b


@dataclass
class ConsoleStack:
    settings: Settings
    url: str
    key_a: str
    key_b: str


@pytest.fixture(scope="session")
@requires("slow")
def console_stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ConsoleStack]:
    """SQLite, migrated, two tenants (a and b) with a key each, the API under uvicorn; no worker, no reconciler."""
    settings, _ = stack_settings(
        "sqlite", tmp_path_factory.mktemp("console"), model_dir, reconcile_interval_seconds=0, auth_enabled=True
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    key_a = mint_api_key(settings, "ui-tenant-a", new_tenant=True)
    key_b = mint_api_key(settings, "ui-tenant-b", new_tenant=True)
    with api_server(settings) as url:
        yield ConsoleStack(settings=settings, url=url, key_a=key_a, key_b=key_b)
