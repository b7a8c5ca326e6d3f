"""A real headless Chromium (Debian's `chromium`, driven by Playwright for Python) and the API as a real server.

Playwright is used with the system browser only (`executable_path`): `playwright install` downloads browsers from
outside the package registries and is never run. Root needs `--no-sandbox`.

Every page a test opens records the requests it makes (`RecordedPage.hosts`), so a test can check that nothing
the console or /docs loads comes from anywhere but the API's host, and the console errors it logs.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.settings import Settings
from tests.support.paths import ROOT
from tests.support.processes import free_port

# Where the tests save a screenshot of each page (ignored by git; a few are copied to docs/ by hand).
SCREENSHOT_DIR = Path(os.environ.get("TUNESERVE_SCREENSHOT_DIR", ROOT / "var" / "screenshots"))
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The system Chromium, or None (the browser tests then skip, saying how to install it)."""
    explicit = os.environ.get("TUNESERVE_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def api_server(settings: Settings) -> Iterator[str]:
    """The API (create_app on `settings`) under uvicorn on a free loopback port, in a thread; yields its URL.

    A browser needs a real HTTP server (the stack's TestClient is in-process only). The thread's app runs its own
    reconciler unless the settings turn it off, like a second API replica would.
    """
    import uvicorn

    from api.main import create_app

    port = free_port()
    # A page may still hold a job's event stream open when the test ends: do not wait on it for long.
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=f"api-{port}")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the API server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@dataclass
class RecordedPage:
    """A Playwright page with every request URL and every console error it produced."""

    page: Any
    base_url: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def goto(self, path: str, *, wait_until: str = "networkidle") -> None:
        """Open a page; a console page also waits for its script to be ready. A job page keeps its event stream
        open, so the network is never idle there: open it with wait_until="load"."""
        self.page.goto(f"{self.base_url}{path}", wait_until=wait_until)
        if path.startswith("/ui"):
            self.wait_ready()

    def wait_ready(self) -> None:
        self.page.locator("body[data-ready='true']").wait_for(state="attached")

    def hosts(self) -> set[str]:
        """scheme://host:port of every request that left the page (data: and blob: URLs stay in the browser)."""
        out = set()
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob", "about"):
                continue
            out.add(f"{parts.scheme}://{parts.netloc}")
        return out

    def off_host(self) -> list[str]:
        own = urlsplit(self.base_url)
        return [
            u
            for u in self.requests
            if urlsplit(u).scheme not in ("data", "blob", "about")
            and (urlsplit(u).scheme, urlsplit(u).netloc) != (own.scheme, own.netloc)
        ]

    def script_errors(self) -> list[str]:
        """Console errors but Chromium's "Failed to load resource" for a refused request (a test may provoke one)."""
        return [e for e in self.console_errors if not e.startswith("Failed to load resource")]

    def screenshot(self, name: str, *, full_page: bool = True) -> Path:
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOT_DIR / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@contextmanager
def chromium(executable: str) -> Iterator[Any]:
    """A headless Chromium browser (the system one); closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"], headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def recorded_page(browser: Any, base_url: str, **context_options: Any) -> Iterator[RecordedPage]:
    """A fresh browser context (its own sessionStorage: one signed-in user) and page, recording its requests.

    Every request the page makes is recorded (page.on("request")); one to any other host is also aborted, so a
    test fails on the host check rather than waiting on a network this machine may not have.
    """
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
    own = urlsplit(base_url).netloc
    recorded = RecordedPage(page=None, base_url=base_url)

    def route(route: Any) -> None:
        if urlsplit(route.request.url).netloc == own:
            route.continue_()
        else:
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("request", lambda request: recorded.requests.append(request.url))
    page.set_default_timeout(20_000)
    page.on(
        "console", lambda message: recorded.console_errors.append(message.text) if message.type == "error" else None
    )
    page.on("pageerror", lambda error: recorded.console_errors.append(str(error)))
    recorded.page = page
    try:
        yield recorded
    finally:
        context.close()


def sign_in(recorded: RecordedPage, api_key: str) -> None:
    """Through the sign-in form, as a user would."""
    recorded.goto("/ui")
    page = recorded.page
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/jobs")
    recorded.wait_ready()
