"""API keys and tenants: no key or a bad one is a 401; another tenant's resources are a 404 everywhere
(generate?adapter= and the OpenAI routes included) and absent from every list; Idempotency-Keys and the
active-job limit are per tenant; keys are made and revoked with the admin command. Both stacks."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.paths import ROOT
from tests.support.stack import Stack, bearer, mint_api_key

NO_EVAL = {"enabled": False}


@pytest.fixture(scope="module")
def owner_resources(stack: Stack, demo_dataset: dict) -> dict[str, Any]:
    """One of every resource, owned by the stack's (default) tenant: a dataset, a trained job and its
    adapter, an evaluation and an adapter operation."""
    client = stack.client
    job = client.post(
        "/jobs", json={"dataset_id": demo_dataset["id"], "hyperparameters": {"max_steps": 2}, "evaluation": NO_EVAL}
    )
    assert job.status_code == 201, job.text
    done = stack.wait_for_job(job.json()["id"])
    assert done["status"] == "succeeded", done
    evaluation = client.post("/evaluations", json={"dataset_id": demo_dataset["id"], "max_examples": 2})
    assert evaluation.status_code == 201, evaluation.text
    operation = client.post(f"/adapters/{done['fine_tuned_model']}/derive", json={"scale": 0.5})
    assert operation.status_code == 202, operation.text
    return {
        "dataset": demo_dataset["id"],
        "job": done["id"],
        "adapter": done["fine_tuned_model"],
        "evaluation": evaluation.json()["id"],
        "operation": operation.json()["id"],
    }


@pytest.fixture(scope="module")
def other_tenant(stack: Stack) -> Iterator[TestClient]:
    """A client of a second tenant on the same API (same app, its own key)."""
    key = mint_api_key(stack.settings, f"other-{uuid.uuid4().hex[:8]}", new_tenant=True)
    with TestClient(stack.client.app, headers=bearer(key)) as client:
        yield client


def _assert_404(response: Any, param: str) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and error["param"] == param, error


def test_requests_without_a_valid_key_are_401(stack: Stack) -> None:
    anonymous = TestClient(stack.client.app)
    for headers, code in (
        ({}, "missing_api_key"),
        (bearer("tsk_not-a-key"), "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
    ):
        for method, path in (
            ("GET", "/jobs"),
            ("GET", "/datasets"),
            ("POST", "/jobs"),
            ("GET", "/adapters"),
            ("GET", "/v1/models"),
            ("POST", "/generate"),
        ):
            response = anonymous.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == code, error
    # Probes and metrics stay open: orchestrators and Prometheus carry no tenant key.
    for path in ("/healthz", "/metrics"):
        assert anonymous.get(path).status_code == 200


def test_another_tenants_resources_are_404_everywhere(
    stack: Stack, owner_resources: dict[str, Any], other_tenant: TestClient
) -> None:
    r, other = owner_resources, other_tenant
    adapter, job = r["adapter"], r["job"]
    for path, param in (
        (f"/datasets/{r['dataset']}", "dataset_id"),
        (f"/jobs/{job}", "job_id"),
        (f"/jobs/{job}/events", "job_id"),
        (f"/jobs/{job}/checkpoints", "job_id"),
        (f"/jobs/{job}/report", "job_id"),
        (f"/adapters/{adapter}", "name"),
        (f"/evaluations/{r['evaluation']}", "evaluation_id"),
        (f"/evaluations/{r['evaluation']}/samples", "evaluation_id"),
        (f"/adapter-operations/{r['operation']}", "operation_id"),
    ):
        _assert_404(other.get(path), param)
    _assert_404(other.post(f"/jobs/{job}/cancel"), "job_id")
    _assert_404(other.post(f"/adapters/{adapter}/derive", json={"scale": 0.5}), "name")
    _assert_404(other.post(f"/adapters/{adapter}/merge", json={"scale": 0.5}), "name")
    _assert_404(other.delete(f"/adapters/{adapter}"), "name")
    _assert_404(other.post("/jobs", json={"dataset_id": r["dataset"], "evaluation": NO_EVAL}), "dataset_id")
    _assert_404(other.post("/evaluations", json={"dataset_id": r["dataset"]}), "dataset_id")
    # Generation checks the adapter's tenant before serving is asked (none runs on this stack).
    _assert_404(other.post("/generate", params={"adapter": adapter}, json={"prompt": "hi"}), "adapter")
    chat = {"model": adapter, "messages": [{"role": "user", "content": "hi"}]}
    _assert_404(other.post("/v1/chat/completions", json=chat), "model")
    _assert_404(other.post("/v1/completions", json={"model": adapter, "prompt": "hi"}), "model")

    # Nothing of the owner's shows up in the other tenant's lists, and the owner still has it all.
    listed = {
        path: {row.get("id") for row in other.get(path, params={"limit": 100}).json()["data"]}
        for path in ("/datasets", "/jobs", "/adapters", "/evaluations", "/v1/models")
    }
    for value in (r["dataset"], job, r["evaluation"]):
        assert all(value not in ids for ids in listed.values())
    assert adapter not in {row["name"] for row in other.get("/adapters", params={"limit": 100}).json()["data"]}
    assert adapter not in listed["/v1/models"]
    assert stack.client.get(f"/adapters/{adapter}").status_code == 200
    assert stack.client.get(f"/jobs/{job}").json()["status"] == "succeeded"


def test_the_other_tenant_can_use_its_own_data(stack: Stack, other_tenant: TestClient, demo_files: tuple) -> None:
    """Tenancy hides, it does not break: the other tenant uploads and queues as usual, and the owner can't see it."""
    train, _ = demo_files
    uploaded = other_tenant.post("/datasets", files={"file": ("train.jsonl", train.read_bytes())})
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]
    assert [d["id"] for d in other_tenant.get("/datasets").json()["data"]] == [dataset_id]
    _assert_404(stack.client.get(f"/datasets/{dataset_id}"), "dataset_id")


def test_another_tenants_id_as_after_cursor_does_not_move_the_page(
    stack: Stack, other_tenant: TestClient, demo_files: tuple
) -> None:
    """`after` is tenant-scoped: another tenant's id (here older than one of ours) is ignored as unknown, where it
    used to cut the page at that row's creation time (telling when another tenant made something)."""
    train, _ = demo_files
    files = {"file": ("train.jsonl", train.read_bytes())}
    theirs = other_tenant.post("/datasets", files=files).json()["id"]
    newer = stack.client.post("/datasets", files=files).json()["id"]
    first_page = stack.client.get("/datasets", params={"limit": 100}).json()
    assert first_page["data"][0]["id"] == newer
    assert stack.client.get("/datasets", params={"limit": 100, "after": theirs}).json() == first_page
    assert stack.client.get("/datasets", params={"limit": 100, "after": "ds-unknown"}).json() == first_page
    # Their own cursor still pages their own list.
    their_ids = [d["id"] for d in other_tenant.get("/datasets", params={"limit": 100}).json()["data"]]
    after_theirs = other_tenant.get("/datasets", params={"limit": 100, "after": theirs}).json()["data"]
    assert [d["id"] for d in after_theirs] == their_ids[their_ids.index(theirs) + 1 :]


def test_idempotency_keys_are_per_tenant(stack: Stack, other_tenant: TestClient, demo_files: tuple) -> None:
    train, _ = demo_files
    key = {"Idempotency-Key": f"shared-{uuid.uuid4()}"}
    files = {"file": ("train.jsonl", train.read_bytes())}
    mine = stack.client.post("/datasets", files=files, headers=key)
    theirs = other_tenant.post("/datasets", files=files, headers=key)
    assert (mine.status_code, theirs.status_code) == (201, 201), (mine.text, theirs.text)
    assert mine.json()["id"] != theirs.json()["id"]
    assert "Idempotent-Replayed" not in theirs.headers


def test_the_active_job_limit_is_per_tenant(stack: Stack, demo_files: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit, a tenant gets 429 with Retry-After; another tenant's jobs do not count against it."""
    train, _ = demo_files
    monkeypatch.setattr(stack.settings, "max_active_jobs", 1)
    clients, jobs = [], []
    try:
        for name in ("busy", "quiet"):
            key = mint_api_key(stack.settings, f"{name}-{uuid.uuid4().hex[:8]}", new_tenant=True)
            client = TestClient(stack.client.app, headers=bearer(key))
            clients.append(client)
            dataset = client.post("/datasets", files={"file": ("train.jsonl", train.read_bytes())}).json()["id"]
            body = {"dataset_id": dataset, "hyperparameters": {"max_steps": 1000}, "evaluation": NO_EVAL}
            first = client.post("/jobs", json=body)
            assert first.status_code == 201, first.text
            jobs.append((client, first.json()["id"]))
            if name == "busy":
                refused = client.post("/jobs", json=body)
                assert refused.status_code == 429, refused.text
                assert refused.headers["Retry-After"] == str(stack.settings.active_jobs_retry_after_seconds)
    finally:
        for client, job_id in jobs:
            assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
        for client, job_id in jobs:
            _wait_terminal(client, job_id)


def _wait_terminal(client: TestClient, job_id: str) -> None:
    """Wait out a cancelled job of another tenant (the stack's own client cannot see it)."""
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{job_id}").json()["status"] not in ("cancelled", "failed", "succeeded"):
        assert time.monotonic() < deadline, f"job {job_id} did not stop"
        time.sleep(0.25)


def _admin(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "admin", *args],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_admin_command_creates_and_revokes_keys(stack: Stack) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    created = _admin(stack, "create-tenant", tenant)
    assert created.returncode == 0, created.stderr
    assert _admin(stack, "create-tenant", tenant).returncode == 1  # names are unique
    minted = _admin(stack, "create-key", tenant, "--label", "ci")
    assert minted.returncode == 0, minted.stderr
    secret = minted.stdout.strip()
    assert secret.startswith("tsk_") and len(secret) > 40
    key_id = minted.stderr.split()[1]
    assert _admin(stack, "create-key", "no-such-tenant").returncode == 1

    client = TestClient(stack.client.app, headers=bearer(secret))
    assert client.get("/jobs").status_code == 200
    listing = _admin(stack, "list-keys").stdout
    assert key_id in listing and secret not in listing  # only a prefix is ever shown again

    revoked = _admin(stack, "revoke-key", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert client.get("/jobs").status_code == 401
    assert _admin(stack, "revoke-key", key_id).returncode == 1


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_auth_off_only_by_setting_and_then_everything_is_the_default_tenants(stack: Stack) -> None:
    from api.main import create_app

    open_settings = stack.settings.model_copy(update={"auth_enabled": False, "reconcile_interval_seconds": 0})
    with TestClient(create_app(open_settings), base_url="http://127.0.0.1:8000") as keyless:  # a loopback Host
        mine = {d["id"] for d in stack.client.get("/datasets", params={"limit": 100}).json()["data"]}
        seen = {d["id"] for d in keyless.get("/datasets", params={"limit": 100}).json()["data"]}
    assert stack.settings.auth_enabled and seen == mine  # the stack's key is the default tenant's
