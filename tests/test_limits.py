"""Deployment limits through the API: active jobs (429 + Retry-After), dataset rows, line length, messages and
characters per row (422), request bodies (413 before routing; 401 before the body is read without a key, against a
real uvicorn), prompt characters (422 before tokenizing) and integers past their column (422)."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from core.db import session_scope
from core.models import DEFAULT_TENANT_ID
from core.repository import jobs as jobs_repo
from tests.support.markers import requires
from tests.support.paths import ROOT
from tests.support.processes import die_with_parent
from tests.support.stack import Stack

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _job_ids(stack: Stack) -> set[str]:
    return {j["id"] for j in stack.client.get("/jobs", params={"limit": 100}).json()["data"]}


def test_jobs_past_max_active_jobs_are_429_and_create_nothing(
    paused_stack: Stack, demo_dataset: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = paused_stack
    with session_scope(stack.settings.database_url) as s:
        active = jobs_repo.count_active(s, DEFAULT_TENANT_ID)
    monkeypatch.setattr(stack.settings, "max_active_jobs", active + 2)
    body = {"dataset_id": demo_dataset["id"], "evaluation": {"enabled": False}}
    admitted = [stack.client.post("/jobs", json=body) for _ in range(2)]
    assert [r.status_code for r in admitted] == [201, 201]
    before = _job_ids(stack)

    refused = stack.client.post("/jobs", json=body, headers={"Idempotency-Key": "over-the-limit"})
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == str(stack.settings.active_jobs_retry_after_seconds)
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert f"the limit is {active + 2}" in error["message"]
    assert _job_ids(stack) == before

    # A finished job frees a place; the refused request's key was not used up.
    assert stack.client.post(f"/jobs/{admitted[0].json()['id']}/cancel").status_code == 200
    retried = stack.client.post("/jobs", json=body, headers={"Idempotency-Key": "over-the-limit"})
    assert retried.status_code == 201, retried.text


def test_dataset_row_limit(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack.settings, "max_dataset_rows", 3)
    assert stack.client.post("/datasets", files={"file": ("ok.jsonl", _jsonl(CHAT, CHAT, CHAT))}).status_code == 201
    response = stack.client.post("/datasets", files={"file": ("big.jsonl", _jsonl(CHAT, CHAT, CHAT, CHAT))})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "file:file" and "more than 3 rows" in error["message"]


def test_dataset_line_length_limit(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack.settings, "max_line_bytes", 200)
    long_row = {"prompt": "x" * 300, "completion": "y"}
    response = stack.client.post(
        "/datasets", files={"file": ("long.jsonl", _jsonl({"prompt": "a", "completion": "b"}, long_row))}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "file:2:line" and "the limit is 200 bytes" in error["message"]


def test_concurrent_submissions_do_not_overshoot_max_active_jobs(
    paused_stack: Stack, demo_dataset: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = paused_stack
    with session_scope(stack.settings.database_url) as s:
        active = jobs_repo.count_active(s, DEFAULT_TENANT_ID)
    monkeypatch.setattr(stack.settings, "max_active_jobs", active + 3)
    body = {"dataset_id": demo_dataset["id"], "evaluation": {"enabled": False}}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: stack.client.post("/jobs", json=body), range(8)))
    assert sorted(r.status_code for r in responses) == [201] * 3 + [429] * 5, [r.text for r in responses]
    with session_scope(stack.settings.database_url) as s:
        assert jobs_repo.count_active(s, DEFAULT_TENANT_ID) == active + 3


# --- request bodies: capped before routing, and refused without a key before they are read -----------------------


def test_a_json_body_past_max_json_body_bytes_is_413_naming_the_setting(stack: Stack) -> None:
    limit = stack.settings.max_json_body_bytes
    declared = stack.client.post(
        "/v1/chat/completions", content=b" " * (limit + 1), headers={"content-type": "application/json"}
    )

    def streamed() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(limit // (1 << 20) + 2):
            yield b" " * (1 << 20)

    chunked = stack.client.post("/jobs", content=streamed(), headers={"content-type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "payload_too_large" and "TUNESERVE_MAX_JSON_BODY_BYTES" in error["message"], error
        assert f"{limit} bytes" in error["message"]


def test_a_multipart_upload_past_its_cap_is_413_and_writes_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.settings, "max_upload_bytes", 64 * 1024)
    cap = 64 * 1024 + stack.settings.max_multipart_overhead_bytes
    tmp = stack.settings.store / "tmp"
    before = _dataset_ids(stack)
    big = {"file": ("big.jsonl", _jsonl(*([CHAT] * (cap // 60 + 1))))}
    declared = stack.client.post("/datasets", files=big)
    boundary = "hostile-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'.encode()
        + b"x" * (cap + 1)
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def streamed() -> Iterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    chunked = stack.client.post(
        "/datasets", content=streamed(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["param"] == "file" and "TUNESERVE_MAX_UPLOAD_BYTES" in error["message"], error
    assert _dataset_ids(stack) == before
    assert not any(tmp.iterdir())


def _dataset_ids(stack: Stack) -> set[str]:
    return {d["id"] for d in stack.client.get("/datasets", params={"limit": 100}).json()["data"]}


@pytest.fixture(scope="module")
@requires("stack")
def live_api(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path
) -> Iterator[tuple[int, subprocess.Popen[bytes], str]]:
    """`tuneserve-api` (uvicorn, auth on) on the embedded stack: (port, process, a tenant key). No worker is needed."""
    from core.migrate import upgrade
    from core.settings import Settings
    from tests.support.stack import mint_api_key, settings_env

    data_dir = tmp_path_factory.mktemp("live-api")
    settings = Settings(data_dir=data_dir, base_model=str(model_dir), reconcile_interval_seconds=0)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = dict(settings_env(settings), TUNESERVE_API_PORT=str(port), TUNESERVE_RECONCILE_INTERVAL_SECONDS="0")
    log = (data_dir / "api.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-c", "from api.main import run; run()"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the api exited; log: {data_dir / 'api.log'}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the api did not start"
                time.sleep(0.2)
        yield port, process, mint_api_key(settings)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _peak_rss_mib(pid: int) -> int:
    """VmHWM: the most resident memory the process has ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def _stream_chunked(port: int, path: str, total: int, headers: dict[str, str]) -> tuple[str, int]:
    """POST a chunked JSON body of `total` bytes over a raw socket, stopping as soon as the server answers (or
    drops the connection): the status line, and how many body bytes were sent before that."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    chunk = b"a" * (1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n{head}\r\n".encode()
        )
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            if sent >= total:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed the connection: read its answer
        sock.settimeout(30)
        status = sock.recv(65536).split(b"\r\n", 1)[0].decode()
    return status, sent


def test_no_key_is_refused_before_a_300_mb_body_is_read(live_api: tuple[int, subprocess.Popen[bytes], str]) -> None:
    """Before, the API read (and parsed) the whole body first: 300 MB unauthenticated grew its peak memory by about
    900 MiB before the 401. Now the 401 comes after the headers, without reading the body at all."""
    port, process, key = live_api
    before = _peak_rss_mib(process.pid)
    total = 300 * (1 << 20)
    for headers in ({}, {"Authorization": "Bearer tsk_not-a-key"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        status, sent = _stream_chunked(port, "/v1/chat/completions", total, headers)
        assert status.startswith("HTTP/1.1 401"), status
        assert sent <= 16 * (1 << 20), f"{sent} body bytes were taken before the 401"
    grown = _peak_rss_mib(process.pid) - before
    assert grown < 64, f"the API's peak memory grew by {grown} MiB"


def test_a_streamed_body_past_the_cap_is_413_as_soon_as_it_passes(
    live_api: tuple[int, subprocess.Popen[bytes], str],
) -> None:
    port, process, key = live_api
    before = _peak_rss_mib(process.pid)
    status, sent = _stream_chunked(port, "/v1/chat/completions", 300 * (1 << 20), {"Authorization": f"Bearer {key}"})
    assert status.startswith("HTTP/1.1 413"), status
    assert sent <= 32 * (1 << 20), f"{sent} bytes were taken before the 413 (the cap is 4 MiB)"
    grown = _peak_rss_mib(process.pid) - before
    assert grown < 64, f"the API's peak memory grew by {grown} MiB"


# --- generation input: characters capped before tokenizing -------------------------------------------------------


def test_prompts_past_max_prompt_chars_are_422_not_500(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a /v1/completions list item or a /v1/chat/completions content over 1M characters was a 500 (the
    API built serving's request model from it). Serving is not running here: the check comes first, before the body
    is forwarded to vLLM."""
    model = stack.settings.served_model_name
    huge = "x" * 1_000_001
    cases = [
        ("/v1/completions", {"model": model, "prompt": ["hi", huge]}, "prompt[1]"),
        (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": huge}]},
            "messages",  # the limit is on all messages' text together
        ),
        (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": huge}]}]},
            "messages",
        ),
    ]
    for path, body, param in cases:
        response = stack.client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param, response.text

    monkeypatch.setattr(stack.settings, "max_prompt_chars", 100)
    monkeypatch.setattr(stack.settings, "max_prompts_per_request", 2)
    monkeypatch.setattr(stack.settings, "max_messages_per_request", 3)
    text_parts = [{"type": "text", "text": "y" * 60}] * 2  # 120 characters once joined, each part within the limit
    setting_cases = [
        ("/v1/completions", {"model": model, "prompt": ["ok", "z" * 101]}, "prompt[1]", "TUNESERVE_MAX_PROMPT_CHARS"),
        ("/v1/completions", {"model": model, "prompt": ["a", "b", "c"]}, "prompt", "TUNESERVE_MAX_PROMPTS_PER_REQUEST"),
        (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": text_parts}]},
            "messages",
            "TUNESERVE_MAX_PROMPT_CHARS",
        ),
        (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "a"}] * 4},
            "messages",
            "TUNESERVE_MAX_MESSAGES_PER_REQUEST",
        ),
        ("/generate", {"prompt": "z" * 101}, "prompt", "TUNESERVE_MAX_PROMPT_CHARS"),
        (
            "/generate",
            {"messages": [{"role": "user", "content": "z" * 51}] * 2},
            "messages",
            "TUNESERVE_MAX_PROMPT_CHARS",
        ),
    ]
    for path, body, param, setting in setting_cases:
        response = stack.client.post(path, json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == param and setting in error["message"], error


# --- datasets: rows bounded for training --------------------------------------------------------------------------


def test_dataset_rows_past_the_message_and_character_caps_are_422(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.settings, "max_messages_per_row", 4)
    monkeypatch.setattr(stack.settings, "max_chars_per_row", 50)
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    cases = [
        (_jsonl(CHAT, {"messages": turns * 3}), "file:2:messages", "TUNESERVE_MAX_MESSAGES_PER_ROW"),
        (
            _jsonl(
                CHAT,
                CHAT,
                {"messages": [{"role": "user", "content": "q" * 49}, {"role": "assistant", "content": "ab"}]},
            ),
            "file:3:messages",
            "TUNESERVE_MAX_CHARS_PER_ROW",
        ),
        (_jsonl({"prompt": "p" * 40, "completion": "c" * 11}), "file:1:row", "TUNESERVE_MAX_CHARS_PER_ROW"),
    ]
    for data, param, setting in cases:
        response = stack.client.post("/datasets", files={"file": ("rows.jsonl", data)})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_dataset" and error["param"] == param and setting in error["message"], error
    assert (
        stack.client.post("/datasets", files={"file": ("ok.jsonl", _jsonl({"messages": turns * 2}))}).status_code == 201
    )


def test_a_split_seed_past_32_bits_is_422_before_anything_is_written(stack: Stack) -> None:
    """Before: an OverflowError from the database, a 500."""
    tmp = stack.settings.store / "tmp"
    before = _dataset_ids(stack)
    for seed in (2**31, 2**63, 2**200):
        response = stack.client.post(
            "/datasets",
            files={"file": ("s.jsonl", _jsonl(*[CHAT] * 4))},
            data={"test_fraction": "0.5", "seed": str(seed)},
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "seed"
    assert _dataset_ids(stack) == before and not any(tmp.iterdir())
