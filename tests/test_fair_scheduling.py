"""Fair scheduling (issue 25, item 7): a worker's message is a wake-up, and the worker claims the fairly next record.

Tenants with waiting work take turns (fewest running, then least recently served), a tenant at
tenant_max_running_work is skipped, and one of its records is woken again when its slot frees. The order is checked in
SQL on its own (fast), then end to end: tenant A queues ten jobs, then tenant B one; B's runs before A's third.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from core.auth import create_tenant
from core.db import session_scope
from core.migrate import upgrade
from core.models import AdapterOperation, OperationKind, Tenant, utcnow
from core.repository import dispatch, leases
from tests.support.jobs import TRAIN, wait_until
from tests.support.stack import Stack, bearer, mint_api_key

OPERATION = AdapterOperation


def _database(tmp_path: Path) -> tuple[str, dict[str, str]]:
    url = f"sqlite:///{tmp_path / 'fair.db'}"
    upgrade(url)
    with session_scope(url) as s:
        tenants: dict[str, Tenant] = {name: create_tenant(s, f"fair-{name}") for name in ("a", "b")}
        s.flush()
        ids = {name: t.id for name, t in tenants.items()}
    return url, ids


def _queue(url: str, tenant_id: str, n: int) -> list[str]:
    """n adapter operations of the tenant, queued (the kind with no dataset or adapter to make first)."""
    with session_scope(url) as s:
        start = utcnow()
        rows = [
            OPERATION(
                tenant_id=tenant_id,
                kind=OperationKind.derive,
                source_adapter="x",
                scale=1.0,
                created_at=start + timedelta(milliseconds=i),
            )
            for i in range(n)
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _wake(url: str, *, cap: int = 0, owner: str = "w") -> str | None:
    """A worker taking a message: whichever record it names, the claim is the fairly next one."""
    with session_scope(url) as s:
        picked = dispatch.claim_fair(s, owner=owner, lease_seconds=60, cap=cap)
    return None if picked is None else picked[1]


def _finish(url: str, record_id: str, owner: str = "w") -> None:
    with session_scope(url) as s:
        assert leases.finish(s, OPERATION, record_id, owner=owner, status_name="succeeded")


def test_tenants_take_turns_and_each_tenants_records_run_oldest_first(tmp_path: Path) -> None:
    url, tenant = _database(tmp_path)
    a = _queue(url, tenant["a"], 10)
    b = _queue(url, tenant["b"], 1)
    ran = []
    for _message in [*a, *b]:  # one message per record
        claimed = _wake(url)
        assert claimed is not None
        ran.append(claimed)
        _finish(url, claimed)
    # Both tenants unserved at first: the oldest waiting (A's first); then B, never served, before A's second.
    assert ran == [a[0], b[0], *a[1:]], ran
    assert _wake(url) is None  # a redelivery finds nothing to claim and is turned away


def test_a_tenant_at_its_cap_is_skipped_and_woken_when_its_slot_frees(tmp_path: Path) -> None:
    url, tenant = _database(tmp_path)
    a = _queue(url, tenant["a"], 3)
    assert _wake(url, cap=1, owner="w1") == a[0]
    b = _queue(url, tenant["b"], 1)
    # A runs one (its cap): the message for A's second wakes a worker for B's record instead.
    assert _wake(url, cap=1, owner="w2") == b[0]
    # Nothing claimable now (A capped, B has nothing waiting): the message is used up and nothing runs.
    assert _wake(url, cap=1, owner="w3") is None
    _finish(url, a[0], owner="w1")
    with session_scope(url) as s:
        # A's slot freed while its waiting records may lack a message: the supervisor sends one for A's next.
        assert dispatch.tenant_waiting_at_cap(s, OPERATION, a[0], cap=1) == (OPERATION, a[1])
        assert dispatch.tenant_waiting_at_cap(s, OPERATION, a[0], cap=0) is None  # no cap, no deficit
    assert _wake(url, cap=1, owner="w1") == a[1]


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_tenant_bs_one_job_runs_before_tenant_as_third(stack: Stack, demo_files: tuple[Path, Path]) -> None:
    """One worker, tiny jobs: A queues ten, then B one. FIFO ran B's eleventh; fair order runs it second."""
    key_b = mint_api_key(stack.settings, "fair-b", new_tenant=True)

    def upload(headers: dict[str, str] | None = None) -> str:
        with demo_files[0].open("rb") as f:
            response = stack.client.post("/datasets", files={"file": ("train.jsonl", f)}, headers=headers)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def submit(dataset_id: str, headers: dict[str, str] | None = None) -> str:
        body = {
            "dataset_id": dataset_id,
            "hyperparameters": {**TRAIN, "max_steps": 2},
            "evaluation": {"enabled": False},
        }
        response = stack.client.post("/jobs", json=body, headers=headers)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return dict(stack.client.get(f"/jobs/{job_id}", headers=headers).json())

    def started(job_id: str, headers: dict[str, str] | None = None) -> int | None:
        """The id of the job's first "attempt 1 started" event: event ids order every job's events together."""
        events = stack.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}, headers=headers).json()["data"]
        return next((e["id"] for e in events if e["message"] == "attempt 1 started"), None)

    ended = {"succeeded", "failed", "cancelled"}
    dataset_a, dataset_b = upload(), upload(bearer(key_b))
    jobs_a = [submit(dataset_a) for _ in range(10)]
    job_b = submit(dataset_b, bearer(key_b))
    try:
        wait_until(lambda: started(job_b, bearer(key_b)) is not None, timeout=180, what="B's job to start")
    finally:
        for job_id in jobs_a:  # the order is settled once B's started: A's others need not run
            stack.client.post(f"/jobs/{job_id}/cancel")
    wait_until(lambda: job(job_b, bearer(key_b))["status"] in ended, timeout=120, what="B's job to end")
    assert job(job_b, bearer(key_b))["status"] == "succeeded"
    wait_until(lambda: all(job(j)["status"] in ended for j in jobs_a), timeout=120, what="A's jobs to end")
    b_started = started(job_b, bearer(key_b))
    a_started = [started(j) for j in jobs_a]
    assert b_started is not None
    # A's first is claimed as it arrives if the worker is free; the next free worker takes B's, before A's second and
    # third (or B's first of all, when the worker was busy and A was served more recently, by an earlier test).
    before_b = [j for j, at in zip(jobs_a, a_started, strict=True) if at is not None and at < b_started]
    assert before_b in ([], jobs_a[:1]), (before_b, jobs_a)
