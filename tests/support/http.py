"""The response type the tests see: Starlette's TestClient uses httpx2 when it is installed (openai pulls it in),
httpx otherwise; servers the tests reach over real HTTP answer httpx responses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

from core.settings import Settings
from tests.support.processes import free_port

if TYPE_CHECKING:
    import httpx
    import httpx2

Response: TypeAlias = "httpx.Response | httpx2.Response"


@contextmanager
def api_server(settings: Settings) -> Iterator[str]:
    """The API app under a real uvicorn (in a thread) for these settings: its URL. For the openai client, real
    concurrency and disconnects, which the in-process TestClient does not have."""
    import uvicorn

    from api.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def assert_error(response: Response, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    """The response is the one error shape with this status, param (and code): its error object."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
