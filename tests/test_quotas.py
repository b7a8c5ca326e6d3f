"""Per-tenant quotas and hostile-input limits (issue 12), on both stacks: each limit under it is accepted, over it
is a 429 (with Retry-After) or a 413 naming its setting, and changes nothing; GET /usage equals the sums in SQL;
cancel routes for evaluations and adapter operations; DELETE /adapters frees the disk; what an evaluation stores
is bounded. Each test runs as a fresh tenant of its own, so its numbers are exact."""

from __future__ import annotations

import io
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.cleanup import purge_deleted_adapter_files
from core.db import session_scope
from core.evaluation.samples import clip
from core.jobspec import Hyperparameters
from core.models import Adapter, AdapterOperation, AdapterStatus, Dataset, Evaluation, EvaluationSample, Job
from core.settings import Settings
from tests.support.stack import Stack, bearer, mint_api_key

NO_EVAL = {"enabled": False}
SAMPLE_CHARS = 64  # the worker of this module cuts stored sample texts to this
SWEEP: dict[str, Any] = {
    "scales": [0.0, 1.0],
    "max_examples": 3,
    "metrics": ["exact_match"],
    "max_new_tokens": 4,
    "batch_size": 4,
}


def tenant_client(stack: Stack, name: str) -> tuple[str, TestClient]:
    """A new tenant of the stack's API: its id and a client with its key."""
    from core.auth import create_tenant

    key_name = f"{name}-{uuid.uuid4().hex[:8]}"
    with session_scope(stack.settings.database_url) as s:
        tenant_id = create_tenant(s, key_name).id
    key = mint_api_key(stack.settings, key_name)
    return tenant_id, TestClient(stack.client.app, headers=bearer(key))


def wait_for(client: TestClient, path: str, done: Any, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path).json()
        if done(body):
            return body
        time.sleep(0.25)
    raise AssertionError(f"{path} not done in {timeout}s: {body}")


def rows(stack: Stack, model: Any, tenant_id: str) -> int:
    with session_scope(stack.settings.database_url) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(model.tenant_id == tenant_id)) or 0)


def snapshot(stack: Stack, tenant_id: str) -> dict[str, Any]:
    """Every row count of the tenant and what is in the store: a refused request must change none of it."""
    store = stack.settings.store
    return {
        **{m.__name__: rows(stack, m, tenant_id) for m in (Dataset, Job, Evaluation, AdapterOperation, Adapter)},
        "files": {
            d: sorted(p.name for p in (store / d).iterdir()) if (store / d).is_dir() else []
            for d in ("datasets", "adapters", "tmp")
        },
    }


def refused(response: Any, status: int, setting: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == setting and f"TUNESERVE_{setting.upper()}" in error["message"], error
    if status == 429:
        assert error["type"] == "rate_limit_error" and response.headers["Retry-After"] == "30", error
    return error


def adapter_archive(stack: Stack, adapter: str) -> bytes:
    """A .tar.gz of a trained adapter's two PEFT files: a valid import for this base model."""
    directory = stack.settings.store / "adapters" / adapter
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            archive.add(directory / name, arcname=name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def owner(stack: Stack, demo_files: tuple[Path, Path]) -> Iterator[dict[str, Any]]:
    """A tenant with a dataset, a trained adapter and a finished two-scale evaluation, made by a worker whose
    stored sample texts are cut to SAMPLE_CHARS; the worker is then stopped for the module, so that what the
    tests submit stays queued. Afterwards the tenant's queued work is cancelled and the usual worker restarted."""
    stack.stop_worker()
    stack.env["TUNESERVE_MAX_SAMPLE_CHARS"] = str(SAMPLE_CHARS)
    stack.start_worker()
    tenant_id, client = tenant_client(stack, "quota")
    try:
        train, test = demo_files
        dataset = client.post("/datasets", files={"file": train.read_bytes(), "test_file": test.read_bytes()})
        assert dataset.status_code == 201, dataset.text
        job: Any = client.post(
            "/jobs",
            json={"dataset_id": dataset.json()["id"], "hyperparameters": {"max_steps": 2}, "evaluation": NO_EVAL},
        )
        assert job.status_code == 201, job.text
        job = wait_for(client, f"/jobs/{job.json()['id']}", lambda j: j["status"] in ("succeeded", "failed"))
        assert job["status"] == "succeeded", job
        sweep: Any = client.post(
            "/evaluations", json={"dataset_id": dataset.json()["id"], "adapter": job["fine_tuned_model"], **SWEEP}
        )
        assert sweep.status_code == 201, sweep.text
        sweep = wait_for(client, f"/evaluations/{sweep.json()['id']}", lambda e: e["status"] in ("succeeded", "failed"))
        assert sweep["status"] == "succeeded", sweep
        stack.stop_worker()
        yield {
            "tenant_id": tenant_id,
            "client": client,
            "dataset": dataset.json(),
            "job": job,
            "adapter": job["fine_tuned_model"],
            "sweep": sweep,
        }
    finally:
        stack.stop_worker()
        stack.env.pop("TUNESERVE_MAX_SAMPLE_CHARS", None)
        with session_scope(stack.settings.database_url) as s:
            from core.repository import leases

            for model in (Job, Evaluation, AdapterOperation):
                for record_id in s.scalars(select(model.id).where(model.tenant_id == tenant_id)):
                    leases.request_cancel(s, model, record_id)
        stack.start_worker()
        client.close()


@pytest.fixture
def fresh(stack: Stack, owner: dict[str, Any]) -> Iterator[tuple[str, TestClient]]:
    """A tenant with nothing yet (the worker is stopped: what it submits stays queued)."""
    tenant_id, client = tenant_client(stack, "fresh")
    yield tenant_id, client
    client.close()


def sql_usage(stack: Stack, tenant_id: str) -> dict[str, int]:
    """The tenant's use computed here, independently of api.services.usage."""
    active = ("queued", "running")
    with session_scope(stack.settings.database_url) as s:

        def total(query: Any) -> int:
            return int(s.scalar(query) or 0)

        kept = (Adapter.tenant_id == tenant_id, Adapter.status != AdapterStatus.deleted)
        jobs = list(s.scalars(select(Job.id).where(Job.tenant_id == tenant_id)))
        return {
            "active_jobs": total(
                select(func.count())
                .select_from(Job)
                .where(Job.tenant_id == tenant_id, Job.status.in_(("validating_files", *active)))
            ),
            "active_evaluations": total(
                select(func.count())
                .select_from(Evaluation)
                .where(Evaluation.tenant_id == tenant_id, Evaluation.status.in_(active))
            ),
            "active_adapter_operations": total(
                select(func.count())
                .select_from(AdapterOperation)
                .where(AdapterOperation.tenant_id == tenant_id, AdapterOperation.status.in_(active))
            ),
            "adapters": total(select(func.count()).select_from(Adapter).where(*kept)),
            "datasets": total(select(func.sum(Dataset.bytes)).where(Dataset.tenant_id == tenant_id)),
            "adapter_bytes": total(select(func.sum(Adapter.size_bytes)).where(*kept, Adapter.method != "merged")),
            "merged_bytes": total(select(func.sum(Adapter.size_bytes)).where(*kept, Adapter.method == "merged")),
            "checkpoints": sum(
                sum(f.stat().st_size for f in (stack.settings.store / "jobs" / j).rglob("*") if f.is_file())
                for j in jobs
                if (stack.settings.store / "jobs" / j).is_dir()
            ),
        }


def test_usage_equals_the_sums_in_sql(stack: Stack, owner: dict[str, Any]) -> None:
    client, tenant_id = owner["client"], owner["tenant_id"]
    # A checkpoint on disk of one of the tenant's jobs counts (the training child writes them there).
    checkpoint = stack.settings.store / "jobs" / owner["job"]["id"] / "checkpoints" / "checkpoint-9" / "optimizer.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"\0" * 12_345)
    try:
        usage = client.get("/usage").json()
        expected = sql_usage(stack, tenant_id)
    finally:
        checkpoint.unlink()
    print(f"\n[{stack.kind}] usage: {usage}")
    assert expected["checkpoints"] >= 12_345 and expected["adapters"] == 1 and expected["datasets"] > 0
    assert usage["object"] == "usage"
    for name in ("active_jobs", "active_evaluations", "active_adapter_operations", "adapters"):
        assert usage[name]["used"] == expected[name], name
    storage = usage["storage_bytes"]
    assert (storage["datasets"], storage["adapters"], storage["merged_models"], storage["checkpoints"]) == (
        expected["datasets"],
        expected["adapter_bytes"],
        expected["merged_bytes"],
        expected["checkpoints"],
    )
    assert storage["evaluation_samples"] > 0  # the owner's finished two-scale evaluation, estimated per sample
    assert (
        storage["used"]
        == expected["datasets"]
        + expected["adapter_bytes"]
        + expected["merged_bytes"]
        + expected["checkpoints"]
        + storage["evaluation_samples"]
    )
    settings = stack.settings
    assert {k: (usage[k]["limit"], usage[k]["setting"]) for k in usage if k != "object"} == {
        "active_jobs": (settings.max_active_jobs, "TUNESERVE_MAX_ACTIVE_JOBS"),
        "active_evaluations": (settings.max_active_evaluations, "TUNESERVE_MAX_ACTIVE_EVALUATIONS"),
        "active_adapter_operations": (
            settings.max_active_adapter_operations,
            "TUNESERVE_MAX_ACTIVE_ADAPTER_OPERATIONS",
        ),
        "adapters": (settings.max_adapters_per_tenant, "TUNESERVE_MAX_ADAPTERS_PER_TENANT"),
        "storage_bytes": (settings.max_storage_bytes_per_tenant, "TUNESERVE_MAX_STORAGE_BYTES_PER_TENANT"),
    }
    # Another tenant's things are not counted.
    _, other = tenant_client(stack, "empty")
    empty = other.get("/usage").json()
    assert empty["storage_bytes"]["used"] == 0 and empty["adapters"]["used"] == 0


def test_active_evaluations_past_the_limit_are_429_and_cancel_frees_a_place(
    stack: Stack, owner: dict[str, Any], fresh: tuple[str, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_id, client = fresh
    rows_file = stack.settings.store / "datasets" / owner["dataset"]["id"] / "test.jsonl"
    dataset = client.post("/datasets", files={"file": rows_file.read_bytes()})
    assert dataset.status_code == 201, dataset.text
    monkeypatch.setattr(stack.settings, "max_active_evaluations", 2)
    body = {"dataset_id": dataset.json()["id"], "split": "train", "max_examples": 2, "metrics": ["exact_match"]}
    admitted = [client.post("/evaluations", json=body) for _ in range(2)]
    assert [r.status_code for r in admitted] == [201, 201], [r.text for r in admitted]
    before = snapshot(stack, tenant_id)
    error = refused(client.post("/evaluations", json=body), 429, "max_active_evaluations")
    assert "the limit is 2" in error["message"]
    assert snapshot(stack, tenant_id) == before

    # Cancel: a queued evaluation is cancelled at once; a second cancel is 409; another tenant's is 404.
    first = admitted[0].json()["id"]
    _, other = tenant_client(stack, "other")
    assert other.post(f"/evaluations/{first}/cancel").status_code == 404
    cancelled = client.post(f"/evaluations/{first}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["cancel_requested"] is True
    assert client.get(f"/evaluations/{first}").json()["status"] == "cancelled"
    again = client.post(f"/evaluations/{first}/cancel")
    assert again.status_code == 409 and again.json()["error"]["param"] == "evaluation_id", again.text
    assert client.post("/evaluations", json=body).status_code == 201
    assert client.get("/usage").json()["active_evaluations"]["used"] == 2


def test_concurrent_evaluations_do_not_overshoot_the_limit(
    stack: Stack, owner: dict[str, Any], fresh: tuple[str, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_id, client = fresh
    monkeypatch.setattr(stack.settings, "max_active_evaluations", 3)
    train = (stack.settings.store / "datasets" / owner["dataset"]["id"] / "test.jsonl").read_bytes()
    dataset = client.post("/datasets", files={"file": train}).json()
    body = {"dataset_id": dataset["id"], "split": "train", "max_examples": 1, "metrics": ["exact_match"]}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/evaluations", json=body), range(8)))
    assert sorted(r.status_code for r in responses) == [201] * 3 + [429] * 5, [r.text for r in responses]
    assert rows(stack, Evaluation, tenant_id) == 3


def test_active_adapter_operations_past_the_limit_are_429(
    stack: Stack, owner: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, tenant_id, adapter = owner["client"], owner["tenant_id"], owner["adapter"]
    monkeypatch.setattr(stack.settings, "max_active_adapter_operations", 1)
    derive = client.post(f"/adapters/{adapter}/derive", json={"scale": 0.5})
    assert derive.status_code == 202, derive.text
    before = snapshot(stack, tenant_id)
    refused(client.post(f"/adapters/{adapter}/merge", json={"scale": 0.5}), 429, "max_active_adapter_operations")
    # An import's canary is an adapter operation too: refused before the archive is read.
    refused(client.post("/adapters", files={"file": ("a.tar.gz", b"not read")}), 429, "max_active_adapter_operations")
    assert snapshot(stack, tenant_id) == before

    operation = derive.json()["id"]
    _, other = tenant_client(stack, "other")
    response = other.post(f"/adapter-operations/{operation}/cancel")
    assert response.status_code == 404 and response.json()["error"]["param"] == "operation_id"
    cancelled = client.post(f"/adapter-operations/{operation}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["cancel_requested"] is True
    again = client.post(f"/adapter-operations/{operation}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "operation_finished"
    merge = client.post(f"/adapters/{adapter}/merge", json={"scale": 0.5})
    assert merge.status_code == 202, merge.text
    assert client.post(f"/adapter-operations/{merge.json()['id']}/cancel").json()["status"] == "cancelled"


def test_adapters_per_tenant_limit_is_413_counting_work_that_makes_one(
    stack: Stack, owner: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, tenant_id, adapter = owner["client"], owner["tenant_id"], owner["adapter"]
    job_body = {"dataset_id": owner["dataset"]["id"], "hyperparameters": {"max_steps": 2}, "evaluation": NO_EVAL}
    assert client.get("/usage").json()["adapters"] == {
        "used": 1,
        "pending": 0,
        "limit": stack.settings.max_adapters_per_tenant,
        "setting": "TUNESERVE_MAX_ADAPTERS_PER_TENANT",
    }
    monkeypatch.setattr(stack.settings, "max_adapters_per_tenant", 1)
    before = snapshot(stack, tenant_id)
    refused(client.post("/jobs", json=job_body), 413, "max_adapters_per_tenant")
    refused(client.post(f"/adapters/{adapter}/derive", json={"scale": 0.5}), 413, "max_adapters_per_tenant")
    refused(client.post(f"/adapters/{adapter}/merge", json={"scale": 0.5}), 413, "max_adapters_per_tenant")
    archive = adapter_archive(stack, adapter)
    refused(client.post("/adapters", files={"file": ("a.tar.gz", archive)}), 413, "max_adapters_per_tenant")
    assert snapshot(stack, tenant_id) == before

    # Room for one more: a queued job takes it (it will make an adapter), so a derive is refused meanwhile.
    monkeypatch.setattr(stack.settings, "max_adapters_per_tenant", 2)
    job = client.post("/jobs", json=job_body)
    assert job.status_code == 201, job.text
    assert client.get("/usage").json()["adapters"]["pending"] == 1
    refused(client.post(f"/adapters/{adapter}/derive", json={"scale": 0.5}), 413, "max_adapters_per_tenant")
    assert client.post(f"/jobs/{job.json()['id']}/cancel").json()["status"] == "cancelled"
    derive = client.post(f"/adapters/{adapter}/derive", json={"scale": 0.5})
    assert derive.status_code == 202, derive.text
    client.post(f"/adapter-operations/{derive.json()['id']}/cancel")


def test_storage_quota_is_413_and_leaves_no_files(
    stack: Stack, owner: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, tenant_id, adapter = owner["client"], owner["tenant_id"], owner["adapter"]
    used = client.get("/usage").json()["storage_bytes"]["used"]
    small = b'{"prompt": "a", "completion": "b"}\n'  # 35 bytes
    big = small * 4
    monkeypatch.setattr(stack.settings, "max_storage_bytes_per_tenant", used + len(small))
    before = snapshot(stack, tenant_id)
    error = refused(client.post("/datasets", files={"file": ("big.jsonl", big)}), 413, "max_storage_bytes_per_tenant")
    assert error["code"] == "storage_quota_exceeded"
    # An import whose files would pass the quota: checked once unpacked; its files are removed with its rows.
    refused(
        client.post("/adapters", files={"file": ("a.tar.gz", adapter_archive(stack, adapter))}),
        413,
        "max_storage_bytes_per_tenant",
    )
    assert snapshot(stack, tenant_id) == before

    # Exactly up to the quota is fine; from then on, work that writes files is refused.
    assert client.post("/datasets", files={"file": ("small.jsonl", small)}).status_code == 201
    assert client.get("/usage").json()["storage_bytes"]["used"] == used + len(small)
    before = snapshot(stack, tenant_id)
    job_body = {"dataset_id": owner["dataset"]["id"], "hyperparameters": {"max_steps": 2}, "evaluation": NO_EVAL}
    refused(client.post("/jobs", json=job_body), 413, "max_storage_bytes_per_tenant")
    refused(client.post(f"/adapters/{adapter}/derive", json={"scale": 0.5}), 413, "max_storage_bytes_per_tenant")
    refused(client.post(f"/adapters/{adapter}/merge", json={"scale": 0.5}), 413, "max_storage_bytes_per_tenant")
    refused(client.post("/datasets", files={"file": ("one.jsonl", small)}), 413, "max_storage_bytes_per_tenant")
    assert snapshot(stack, tenant_id) == before


def test_queued_work_reserves_its_estimated_size(
    stack: Stack, owner: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25, item 8: a merge reserves the base model's size at admission. Under the quota by less than that, a
    merge is refused (413) although the bytes stored are under it; a queued merge's reservation refuses the next."""
    from api.services.usage import tenant_usage
    from core import reservations

    client, tenant_id, adapter = owner["client"], owner["tenant_id"], owner["adapter"]
    with session_scope(stack.settings.database_url) as s:
        used = tenant_usage(s, stack.settings, tenant_id).committed_bytes  # stored + reserved by queued work
    merge = reservations.merge_bytes(stack.settings.base_model)
    monkeypatch.setattr(stack.settings, "max_storage_bytes_per_tenant", used + merge - 1)
    before = snapshot(stack, tenant_id)
    error = refused(client.post(f"/adapters/{adapter}/merge", json={"scale": 0.5}), 413, "max_storage_bytes_per_tenant")
    assert "reserves" in error["message"] and snapshot(stack, tenant_id) == before
    monkeypatch.setattr(stack.settings, "max_storage_bytes_per_tenant", used + merge)
    first = client.post(f"/adapters/{adapter}/merge", json={"scale": 0.5})
    assert first.status_code == 202, first.text
    try:
        refused(client.post(f"/adapters/{adapter}/merge", json={"scale": 0.25}), 413, "max_storage_bytes_per_tenant")
        job = {"dataset_id": owner["dataset"]["id"], "hyperparameters": {"max_steps": 2}, "evaluation": NO_EVAL}
        refused(client.post("/jobs", json=job), 413, "max_storage_bytes_per_tenant")
    finally:
        client.post(f"/adapter-operations/{first.json()['id']}/cancel")


def test_epochs_past_max_steps_and_too_many_checkpoints_are_422(
    stack: Stack, owner: dict[str, Any], fresh: tuple[str, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant_id, client = fresh
    dataset = owner["dataset"]
    assert dataset["splits"]["train"] == 256
    train = (stack.settings.store / "datasets" / dataset["id"] / "train.jsonl").read_bytes()
    mine = client.post("/datasets", files={"file": train}).json()["id"]
    # 3 epochs of 256 rows at 8 x 2 rows a step: 3 x 16 = 48 steps.
    hp = {"n_epochs": 3, "batch_size": 8, "gradient_accumulation_steps": 2}
    monkeypatch.setattr(stack.settings, "max_steps", 47)
    response = client.post("/jobs", json={"dataset_id": mine, "hyperparameters": hp, "evaluation": NO_EVAL})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "hyperparameters.n_epochs" and "48 steps" in error["message"], error
    assert rows(stack, Job, tenant_id) == 0
    monkeypatch.setattr(stack.settings, "max_steps", 48)
    accepted = client.post("/jobs", json={"dataset_id": mine, "hyperparameters": hp, "evaluation": NO_EVAL})
    assert accepted.status_code == 201, accepted.text
    client.post(f"/jobs/{accepted.json()['id']}/cancel")

    keep = {"max_steps": 2, "keep_checkpoints": stack.settings.max_keep_checkpoints + 1}
    response = client.post("/jobs", json={"dataset_id": mine, "hyperparameters": keep, "evaluation": NO_EVAL})
    assert response.status_code == 422 and response.json()["error"]["param"] == "hyperparameters.keep_checkpoints"
    assert "TUNESERVE_MAX_KEEP_CHECKPOINTS" in response.json()["error"]["message"]
    assert rows(stack, Job, tenant_id) == 1


def test_evaluation_samples_store_bounded_text_once(stack: Stack, owner: dict[str, Any]) -> None:
    client, sweep = owner["client"], owner["sweep"]
    page = client.get(f"/evaluations/{sweep['id']}/samples", params={"limit": 100}).json()
    assert page["total"] == 3 * 2
    by_scale = {
        scale: sorted((s for s in page["data"] if s["scale"] == scale), key=lambda s: s["index"])
        for scale in SWEEP["scales"]
    }
    # The API shows every scale's sample with its prompt and reference ...
    assert [(s["prompt"], s["reference"]) for s in by_scale[0.0]] == [
        (s["prompt"], s["reference"]) for s in by_scale[1.0]
    ]
    assert all(len(s["prompt"]) <= SAMPLE_CHARS and "characters not stored" in s["prompt"] for s in page["data"])
    assert all(s["prompt"].endswith("assistant\n") for s in page["data"])  # a prompt's end is kept
    # ... which SQL holds once, with the first scale's samples.
    with session_scope(stack.settings.database_url) as s:
        stored = s.execute(
            select(EvaluationSample.scale, EvaluationSample.prompt, EvaluationSample.reference).where(
                EvaluationSample.evaluation_id == sweep["id"]
            )
        ).all()
    assert sorted((scale, bool(prompt), bool(reference)) for scale, prompt, reference in stored) == (
        [(0.0, True, True)] * 3 + [(1.0, False, False)] * 3
    )
    one = client.get(f"/evaluations/{sweep['id']}/samples", params={"scale": 1.0, "limit": 1}).json()["data"][0]
    assert one["prompt"] == by_scale[0.0][0]["prompt"]


def test_delete_frees_the_adapter_directory(stack: Stack, owner: dict[str, Any]) -> None:
    client, tenant_id, adapter = owner["client"], owner["tenant_id"], owner["adapter"]
    store = stack.settings.store
    # An import whose canary is queued (the worker is stopped): its files stay until the canary is over.
    imported = client.post("/adapters", files={"file": ("a.tar.gz", adapter_archive(stack, adapter))})
    assert imported.status_code == 202, imported.text
    name = imported.json()["name"]
    assert (store / "adapters" / name).is_dir()
    with_import = client.get("/usage").json()
    deleted = client.delete(f"/adapters/{name}")
    assert deleted.status_code == 200 and deleted.json()["files_deleted"] is False, deleted.text
    assert (store / "adapters" / name).is_dir()
    assert name not in purge_deleted_adapter_files(stack.settings)
    assert (store / "adapters" / name).is_dir()
    with session_scope(stack.settings.database_url) as s:
        canary = s.scalar(select(AdapterOperation.id).where(AdapterOperation.source_adapter == name))
    assert client.post(f"/adapter-operations/{canary}/cancel").json()["status"] == "cancelled"
    purge_deleted_adapter_files(stack.settings)  # (the reconciler may run the same sweep first)
    assert not (store / "adapters" / name).exists()
    after = client.get("/usage").json()
    assert after["adapters"]["used"] == with_import["adapters"]["used"] - 1
    assert (
        after["storage_bytes"]["adapters"] == with_import["storage_bytes"]["adapters"] - imported.json()["size_bytes"]
    )

    # Nothing names the trained adapter: its directory goes at once, and it leaves the usage.
    size = client.get(f"/adapters/{adapter}").json()["size_bytes"]
    deleted = client.delete(f"/adapters/{adapter}")
    assert deleted.status_code == 200 and deleted.json()["files_deleted"] is True, deleted.text
    assert not (store / "adapters" / adapter).exists()
    final = client.get("/usage").json()
    assert final["adapters"]["used"] == after["adapters"]["used"] - 1
    assert final["storage_bytes"]["adapters"] == after["storage_bytes"]["adapters"] - size
    assert rows(stack, Adapter, tenant_id) == 2  # the names stay taken, deleted


def test_limits_unit() -> None:
    hp = Hyperparameters(n_epochs=2.5, batch_size=4, gradient_accumulation_steps=3)
    assert hp.steps_upper_bound(100) == 23  # ceil(2.5 x ceil(100 / 12)) = ceil(22.5)
    assert Hyperparameters(max_steps=7).steps_upper_bound(10**6) == 7
    assert Hyperparameters(n_epochs=1, batch_size=64).steps_upper_bound(1) == 1
    settings = Settings(data_dir=Path(os.environ.get("TMPDIR", "/tmp")) / "quota-unit", max_steps=22)
    with pytest.raises(Exception) as refused_steps:
        hp.check_steps(settings, 100)
    assert getattr(refused_steps.value, "param", None) == "hyperparameters.n_epochs"
    assert clip("x" * 64, 64) == "x" * 64
    cut = clip("a" * 50 + "b" * 5000 + "c" * 50, 100)
    assert len(cut) <= 100 and cut.startswith("a") and cut.endswith("c") and "characters not stored" in cut


def test_long_prompts_keep_their_last_tokens(model_dir: Path) -> None:
    """A prompt past the model's length keeps its end (the question and the assistant header)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.evaluation.inference import generate_greedy, model_length, prompt_token_budget

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model_length(model, tokenizer, 10**6) == model.config.max_position_embeddings
    assert model_length(model, tokenizer, 300) == 300
    assert prompt_token_budget(model, tokenizer, max_model_len=300, max_new_tokens=8) == 292
    assert prompt_token_budget(model, tokenizer, max_model_len=8, max_new_tokens=64) == 1
    long_prompt = "word " * 400 + "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 40
    cut = generate_greedy(model, tokenizer, [long_prompt], batch_size=1, max_new_tokens=4, max_prompt_tokens=40)
    tail = generate_greedy(model, tokenizer, [str(tokenizer.decode(ids[-40:]))], batch_size=1, max_new_tokens=4)
    assert cut == tail
