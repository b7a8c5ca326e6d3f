"""Jobs as the fault and durability tests drive them: submitted with fixed knobs, waited on, checked once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.stack import Stack

FAST_RECOVERY = {
    "lease_seconds": 6,  # a dead worker's job is claimable again after this
    "heartbeat_seconds": 1.0,
    "reconcile_interval_seconds": 1.0,
    "requeue_after_seconds": 3,  # a queued job nobody claimed is sent again after this
}
TRAIN = {"learning_rate": 3e-3, "batch_size": 8, "seed": 3}


def upload_dataset(stack: Stack, demo_files: tuple[Path, Path]) -> None:
    train, _ = demo_files
    with train.open("rb") as f:
        response = stack.client.post("/datasets", files={"file": ("train.jsonl", f)})
    assert response.status_code == 201, response.text
    stack.extra["dataset_id"] = response.json()["id"]


def submit_job(stack: Stack, **hp: Any) -> str:
    body = {
        "dataset_id": stack.extra["dataset_id"],
        "hyperparameters": {**TRAIN, **hp},
        "evaluation": {"enabled": False},
    }
    response = stack.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job_events(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return stack.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def assert_succeeded_once(stack: Stack, job_id: str, *, attempts: int) -> list[dict[str, Any]]:
    """Succeeded, after `attempts` attempts each started once, with one success event and one adapter."""
    job = stack.wait_for_job(job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == attempts
    events = job_events(stack, job_id)
    messages = [e["message"] for e in events]
    for attempt in range(1, attempts + 1):
        assert messages.count(f"attempt {attempt} started") == 1, messages
    assert sum(m.startswith("job succeeded") for m in messages) == 1, messages
    adapters = [a for a in stack.client.get("/adapters", params={"limit": 100}).json()["data"] if a["job_id"] == job_id]
    assert len(adapters) == 1 and adapters[0]["name"] == job["fine_tuned_model"]
    return events


def training_children(job_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"worker.training {job_id}"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def wait_until(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)
