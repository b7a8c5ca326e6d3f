"""Deployment limits through the API: active jobs (429 + Retry-After), dataset rows and line length (422)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.db import session_scope
from core.repository import jobs as jobs_repo
from core.models import DEFAULT_TENANT_ID
from tests.conftest import Stack

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
    response = stack.client.post("/datasets", files={"file": ("long.jsonl", _jsonl({"prompt": "a", "completion": "b"}, long_row))})
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
