"""Pause and resume (issue 21): a pause stops a running job at a checkpoint and frees the worker, a queued job pauses at
once, resume continues from the checkpoint (not step 0); natively and through the official openai client.

The state moves are checked in SQL on their own (fast); then one short flow on the embedded stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from core.db import session_scope
from core.migrate import upgrade
from core.models import DEFAULT_TENANT_ID, Dataset, Job, JobStatus, TrainingMethod
from core.repository import job_control, leases
from tests.support.jobs import TRAIN
from tests.support.stack import Stack


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pause.db'}"
    upgrade(url)
    return url


def _job(url: str) -> str:
    with session_scope(url) as s:
        dataset = Dataset(
            tenant_id=DEFAULT_TENANT_ID,
            filename="t.jsonl",
            format="chat",
            train_rows=1,
            split_source="none",
            path="x",
            sha256="0" * 64,
            bytes=1,
        )
        s.add(dataset)
        s.flush()
        job = Job(
            tenant_id=DEFAULT_TENANT_ID,
            base_model="tiny",
            dataset_id=dataset.id,
            method=TrainingMethod.lora,
            hyperparameters={},
            max_attempts=1,
        )
        s.add(job)
        s.flush()
        return job.id


def _row(url: str, job_id: str) -> Job:
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def test_pause_and_resume_move_between_states_in_sql(database: str) -> None:
    url = database
    queued = _job(url)
    with session_scope(url) as s:
        job_control.request_pause(s, queued)
    assert _row(url, queued).status == JobStatus.paused  # nobody ran it: paused at once
    with session_scope(url) as s:
        assert job_control.resume(s, queued)
    assert _row(url, queued).status == JobStatus.queued

    running = _job(url)
    with session_scope(url) as s:
        assert leases.claim(s, Job, running, owner="w", lease_seconds=60)
        job_control.request_pause(s, running)
    job = _row(url, running)
    assert job.status == JobStatus.running and job.pause_requested  # the attempt pauses at its next step
    with session_scope(url) as s:
        assert not job_control.settle_pause(s, running, owner="another", attempt=1)  # not the lease holder's
        assert job_control.settle_pause(s, running, owner="w", attempt=1)
    job = _row(url, running)
    assert (job.status, job.pause_requested, job.lease_owner) == (JobStatus.paused, False, None)
    # The paused attempt is given back: with max_attempts 1 the job can still run again.
    assert (job.attempt_count, job.max_attempts) == (1, 2)
    with session_scope(url) as s:
        assert job_control.resume(s, running)
        assert leases.claim(s, Job, running, owner="w2", lease_seconds=60)
        job_control.request_pause(s, running)
        assert not job_control.resume(s, running)  # a pause not reached yet is called off, nothing re-sent
    job = _row(url, running)
    assert (job.status, job.pause_requested) == (JobStatus.running, False)

    with session_scope(url) as s:
        job_control.request_pause(s, queued)
        leases.request_cancel(s, Job, queued)
    assert _row(url, queued).status == JobStatus.cancelled  # a paused job is cancelled at once


@pytest.fixture
def openai_client(stack: Stack) -> openai.OpenAI:
    """The official client on the in-process API: the TestClient is an httpx.Client (never closed here, it is shared)."""
    base_url = str(stack.client.base_url).rstrip("/") + "/v1"
    return openai.OpenAI(base_url=base_url, api_key=stack.api_key, http_client=stack.client, max_retries=0)


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_pause_frees_the_worker_and_resume_continues_from_the_checkpoint(
    stack: Stack, demo_dataset: dict[str, Any], openai_client: openai.OpenAI
) -> None:
    def submit(max_steps: int) -> str:
        body = {
            "dataset_id": demo_dataset["id"],
            "hyperparameters": {**TRAIN, "max_steps": max_steps},
            "evaluation": {"enabled": False},
        }
        response = stack.client.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(job_id: str) -> dict[str, Any]:
        return dict(stack.client.get(f"/jobs/{job_id}").json())

    def messages(job_id: str) -> list[str]:
        events = stack.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        return [e["message"] for e in events]

    long_job = submit(40)
    stack.wait_for_job(long_job, condition=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    short_job = submit(2)  # waits behind the long one (one worker)
    # The official client's pause on a queued job: paused at once, as the OpenAI job object.
    paused = openai_client.fine_tuning.jobs.pause(short_job)
    assert (paused.id, paused.status) == (short_job, "paused")

    response = stack.client.post(f"/jobs/{long_job}/pause")
    assert response.status_code == 200 and response.json()["pause_requested"], response.text
    at_pause = stack.wait_for_job(long_job, until={"paused"}, timeout=120)
    step = at_pause["progress"]["step"]
    assert 0 < step < 40, at_pause
    assert any(c["step"] >= step for c in stack.client.get(f"/jobs/{long_job}/checkpoints").json()["data"])

    # The worker is free: the short job, resumed, runs to the end while the long one stays paused.
    resumed = openai_client.fine_tuning.jobs.resume(short_job)
    assert resumed.status == "queued"
    assert stack.wait_for_job(short_job, timeout=120)["status"] == "succeeded"
    assert job(long_job)["status"] == "paused"

    response = stack.client.post(f"/jobs/{long_job}/resume")
    assert response.status_code == 200 and response.json()["status"] in {"queued", "running"}, response.text
    done = stack.wait_for_job(long_job, timeout=180)
    assert done["status"] == "succeeded" and done["progress"]["step"] == 40, done
    log = messages(long_job)
    assert "job paused at its last checkpoint" in log and "attempt 2 started" in log, log
    resumed_at = [m for m in log if m.startswith("resuming from checkpoint at step ")]
    assert resumed_at and int(resumed_at[-1].rsplit(" ", 1)[1]) >= step, log

    # Finished: the native route says so (409 naming the job), the OpenAI one answers with the job as it is.
    refused = stack.client.post(f"/jobs/{long_job}/pause")
    assert refused.status_code == 409 and refused.json()["error"]["param"] == "job_id", refused.text
    assert openai_client.fine_tuning.jobs.pause(long_job).status == "succeeded"
