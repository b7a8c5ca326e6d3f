"""Idempotency-Key on POST /jobs and POST /datasets: a retry gets the first resource, a reused key a 422,
and concurrent duplicates make one resource (the unique (endpoint, key) holds), on both stacks."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.support.http import Response
from tests.support.stack import Stack

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
NO_EVAL = {"enabled": False}


def _key() -> str:
    return f"test-{uuid.uuid4()}"


def _jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _job_ids(stack: Stack) -> set[str]:
    return {j["id"] for j in stack.client.get("/jobs", params={"limit": 100}).json()["data"]}


def _dataset_state(stack: Stack) -> tuple[set[str], set[str]]:
    rows = {d["id"] for d in stack.client.get("/datasets", params={"limit": 100}).json()["data"]}
    return rows, {p.name for p in (stack.settings.store / "datasets").iterdir()}


def _post_job(stack: Stack, body: dict[str, Any], key: str) -> Response:
    return stack.client.post("/jobs", json=body, headers={"Idempotency-Key": key})


def _job_body(dataset_id: str, **hp: Any) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "hyperparameters": {"max_steps": 2, **hp}, "evaluation": NO_EVAL}


def test_a_job_retried_with_its_key_is_the_same_job(paused_stack: Stack, demo_dataset: dict) -> None:
    stack, key = paused_stack, _key()
    before = _job_ids(stack)
    first = _post_job(stack, _job_body(demo_dataset["id"]), key)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    # Key order and whitespace do not make it another request.
    raw = json.dumps(
        {"evaluation": NO_EVAL, "hyperparameters": {"max_steps": 2}, "dataset_id": demo_dataset["id"]}, indent=2
    )
    again = stack.client.post(
        "/jobs", content=raw, headers={"Idempotency-Key": key, "Content-Type": "application/json"}
    )
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert _job_ids(stack) - before == {first.json()["id"]}
    events = stack.client.get(f"/jobs/{first.json()['id']}/events").json()["data"]
    assert [e["message"] for e in events] == ["job queued"]


def test_a_key_reused_with_another_job_is_422_and_creates_nothing(paused_stack: Stack, demo_dataset: dict) -> None:
    stack, key = paused_stack, _key()
    assert _post_job(stack, _job_body(demo_dataset["id"]), key).status_code == 201
    before = _job_ids(stack)
    response = _post_job(stack, _job_body(demo_dataset["id"], learning_rate=1e-3), key)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert key in error["message"]
    assert _job_ids(stack) == before


def test_a_refused_request_does_not_use_up_its_key(paused_stack: Stack, demo_dataset: dict) -> None:
    stack, key = paused_stack, _key()
    assert _post_job(stack, _job_body("ds-missing"), key).status_code == 404
    assert _post_job(stack, _job_body(demo_dataset["id"], lora_r=7), key).status_code == 422
    assert _post_job(stack, _job_body(demo_dataset["id"]), key).status_code == 201


def test_keys_belong_to_one_endpoint(paused_stack: Stack, demo_dataset: dict) -> None:
    stack, key = paused_stack, _key()
    assert (
        stack.client.post(
            "/datasets", files={"file": ("a.jsonl", _jsonl(CHAT))}, headers={"Idempotency-Key": key}
        ).status_code
        == 201
    )
    assert _post_job(stack, _job_body(demo_dataset["id"]), key).status_code == 201


def test_a_malformed_key_is_422_naming_the_header(paused_stack: Stack, demo_dataset: dict) -> None:
    stack = paused_stack
    before = _job_ids(stack)
    for bad in ("x" * 256, "has space", ""):
        response = _post_job(stack, _job_body(demo_dataset["id"]), bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["param"] == "Idempotency-Key"
    assert _job_ids(stack) == before


def test_a_dataset_retried_with_its_key_is_the_same_dataset(paused_stack: Stack) -> None:
    stack, key = paused_stack, _key()
    files = {"file": ("a.jsonl", _jsonl(CHAT, CHAT, CHAT, CHAT))}
    before = _dataset_state(stack)
    first = stack.client.post(
        "/datasets", files=files, data={"test_fraction": "0.25", "seed": "3"}, headers={"Idempotency-Key": key}
    )
    assert first.status_code == 201, first.text
    again = stack.client.post(
        "/datasets", files=files, data={"test_fraction": "0.25", "seed": "3"}, headers={"Idempotency-Key": key}
    )
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    rows, dirs = _dataset_state(stack)
    assert rows - before[0] == dirs - before[1] == {first.json()["id"]}

    for other in (
        {"files": files, "data": {"test_fraction": "0.25", "seed": "4"}},  # another form field
        {"files": {"file": ("b.jsonl", files["file"][1])}, "data": {"test_fraction": "0.25", "seed": "3"}},
        {"files": {"file": ("a.jsonl", _jsonl(CHAT, CHAT))}},
    ):  # other bytes
        response = stack.client.post("/datasets", headers={"Idempotency-Key": key}, **other)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert _dataset_state(stack) == (rows, dirs)


def test_concurrent_duplicate_jobs_make_one_job(paused_stack: Stack, demo_dataset: dict) -> None:
    stack, key, n = paused_stack, _key(), 8
    before = _job_ids(stack)
    body = _job_body(demo_dataset["id"])
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda _: _post_job(stack, body, key), range(n)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * (n - 1) + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert _job_ids(stack) - before == {responses[0].json()["id"]}


def test_concurrent_duplicate_uploads_make_one_dataset(paused_stack: Stack) -> None:
    # 4: the per-tenant cap on uploads in progress (max_concurrent_uploads_per_tenant) would turn a fifth away.
    stack, key, n = paused_stack, _key(), 4
    before = _dataset_state(stack)
    payload = _jsonl(*[CHAT] * 50)

    def upload(i: int) -> Response:
        # Half the requests differ (another seed): whichever body wins, the others are replays or 422.
        return stack.client.post(
            "/datasets",
            files={"file": ("c.jsonl", payload)},
            data={"seed": str(i % 2)},
            headers={"Idempotency-Key": key},
        )

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(upload, range(n)))
    created = [r for r in responses if r.status_code == 201]
    assert len(created) == 1, [r.text for r in responses]
    winner = created[0].json()
    for r in responses:
        assert r.status_code in (200, 201, 422), r.text
        if r.status_code == 200:
            assert r.json()["id"] == winner["id"]
        if r.status_code == 422:
            assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert sum(r.status_code == 422 for r in responses) == n // 2
    rows, dirs = _dataset_state(stack)
    assert rows - before[0] == dirs - before[1] == {winner["id"]}


def test_a_key_past_its_ttl_is_free_again(stack: Stack) -> None:
    """Keys are remembered for idempotency_key_ttl_seconds; after that the same key makes a new resource."""
    from datetime import timedelta

    from sqlalchemy import update

    from core.db import session_scope
    from core.models import IdempotencyKey, utcnow

    key, data = _key(), _jsonl(CHAT, CHAT)
    first = stack.client.post("/datasets", files={"file": ("a.jsonl", data)}, headers={"Idempotency-Key": key})
    replay = stack.client.post("/datasets", files={"file": ("a.jsonl", data)}, headers={"Idempotency-Key": key})
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json()["id"] == first.json()["id"]
    # What waiting out the TTL does to the record, without the wait.
    aged = utcnow() - timedelta(seconds=stack.settings.idempotency_key_ttl_seconds + 1)
    with session_scope(stack.settings.database_url) as s:
        s.execute(update(IdempotencyKey).where(IdempotencyKey.key == key).values(created_at=aged))
    fresh = stack.client.post("/datasets", files={"file": ("a.jsonl", data)}, headers={"Idempotency-Key": key})
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["id"] != first.json()["id"]
    again = stack.client.post("/datasets", files={"file": ("a.jsonl", data)}, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["id"] == fresh.json()["id"]
