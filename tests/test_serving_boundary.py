"""Serving's boundary (issue 25, item 3): there is always a token, every path refuses a request without it, and
a WebSocket never reaches vLLM. The real serving process is the shared serving_stack fixture, which runs in the
embedded mode: no TUNESERVE_SERVING_TOKEN, the token generated in data_dir and read by both the API and serving."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import httpx
import pytest

from core.serving_contract import SERVING_PATHS, TOKEN_FILE, TOKEN_HEADER, serving_token
from core.settings import Settings
from tests.support.stack import Stack


def test_the_embedded_token_is_generated_once_private_and_shared(tmp_path: Path) -> None:
    first = serving_token(Settings(data_dir=tmp_path))
    assert len(first) == 64 and serving_token(Settings(data_dir=tmp_path)) == first
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600
    assert serving_token(Settings(data_dir=tmp_path / "other")) != first
    assert serving_token(Settings(data_dir=tmp_path, serving_token="given")) == "given"


@pytest.mark.parametrize(
    "values",
    [{"serving_host": "0.0.0.0"}, {"serving_url": "http://serving:8100"}, {"serving_urls": "http://10.0.0.5:8100"}],
)
def test_beyond_loopback_a_token_is_required_at_start(tmp_path: Path, values: dict[str, str]) -> None:
    from api.main import create_app

    settings = Settings.model_validate({"data_dir": tmp_path, **values})
    with pytest.raises(ValueError, match="TUNESERVE_SERVING_TOKEN"):
        serving_token(settings)
    with pytest.raises(ValueError, match="TUNESERVE_SERVING_TOKEN"):
        create_app(settings)
    assert not (tmp_path / TOKEN_FILE).exists()


def test_serving_refuses_every_route_without_the_token(serving_stack: Stack) -> None:
    serving = serving_stack.extra["serving"]
    assert not serving_stack.settings.serving_token and serving.token == serving_token(serving_stack.settings)
    paths = sorted(SERVING_PATHS) + ["/v1/load_lora_adapter", "/adapters", "/invocations", "/v1/responses", "/x"]
    wrong = [{}, {TOKEN_HEADER: "nope"}, {"Authorization": "Bearer nope"}, {TOKEN_HEADER: ""}]
    for path in paths:
        for headers in wrong:
            for method in ("GET", "POST", "DELETE"):
                response = httpx.request(method, f"{serving.url}{path}", headers=headers, json={}, timeout=30)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["code"] == "invalid_serving_token"
    # With the data dir's token: answered (the API's own calls go through this too).
    for headers in ({TOKEN_HEADER: serving.token}, {"Authorization": f"Bearer {serving.token}"}):
        assert httpx.get(f"{serving.url}/metrics", headers=headers, timeout=30).status_code == 200
    assert serving_stack.client.get("/v1/models").status_code == 200


def test_a_websocket_is_closed_before_vllm_sees_it(serving_stack: Stack) -> None:
    serving = serving_stack.extra["serving"]
    host, port = serving.url.removeprefix("http://").split(":")
    for path in ("/v1/realtime", "/health"):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(
                (
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"{TOKEN_HEADER}: {serving.token}\r\n\r\n"
                ).encode()
            )
            status_line = conn.recv(4096).split(b"\r\n", 1)[0]
        assert b" 101 " not in status_line and b" 403 " in status_line, status_line


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "api.example"])
def test_auth_off_beyond_loopback_does_not_start(tmp_path: Path, host: str) -> None:
    from api.main import create_app

    with pytest.raises(ValueError, match="TUNESERVE_AUTH_ENABLED=false needs a loopback"):
        create_app(Settings(data_dir=tmp_path, auth_enabled=False, api_host=host))
    create_app(Settings(data_dir=tmp_path, auth_enabled=False, api_host="127.0.0.1"))
    create_app(Settings(data_dir=tmp_path, auth_enabled=True, api_host=host))
