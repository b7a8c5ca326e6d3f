"""Faults injected into real processes (loopback only): a SIGKILLed worker, a broker down at submit, an API
killed between commit and send, a duplicate delivery, Redis re-delivering a job still training (a visibility
timeout shorter than the job), Redis restarted mid-job. Every job still succeeds exactly once, with one adapter.

The stack here has a short lease and a fast reconciler (the API's, running in the TestClient's lifespan),
so a lost job comes back within seconds instead of minutes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.db import session_scope
from core.jobspec import JobSpec
from core.models import DEFAULT_TENANT_ID, Job, JobEvent, JobStatus
from core.queue import send
from core.repository import jobs as jobs_repo
from core.repository import leases
from tests.support.jobs import (
    FAST_RECOVERY,
    TRAIN,
    assert_succeeded_once,
    job_events,
    submit_job,
    training_children,
    upload_dataset,
    wait_until,
)
from tests.support.markers import requires
from tests.support.processes import die_with_parent, free_port, stop_process_group
from tests.support.stack import Stack, bearer, running_stack


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
@requires("stack")
def fault_stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    model_dir: Path,
    demo_files: tuple[Path, Path],
) -> Iterator[Stack]:
    kind = request.param
    with running_stack(kind, tmp_path_factory.mktemp(f"faults-{kind}"), model_dir, **FAST_RECOVERY) as stack:
        upload_dataset(stack, demo_files)
        yield stack


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigkilled_worker_job_resumes_from_its_checkpoint_on_a_new_worker(fault_stack: Stack) -> None:
    stack = fault_stack
    job_id = submit_job(stack, max_steps=24, checkpoint_every_steps=8, keep_checkpoints=2)
    stack.wait_for_job(job_id, condition=lambda j: j["progress"]["step"] >= 10, timeout=90)
    assert training_children(job_id)

    stack.stop_worker(signal.SIGKILL)  # the worker's whole process group, mid-training
    # PR_SET_PDEATHSIG: the training child (its own session) dies with the worker, it is not orphaned.
    wait_until(lambda: not training_children(job_id), timeout=15, what="the training child to die with its worker")
    assert stack.client.get(f"/jobs/{job_id}").json()["status"] == "running"  # until the lease expires

    # The broker still holds the dead worker's unacked message (Redis: until the visibility timeout;
    # SQLite: for good). The reconciler re-sends the job once its lease has expired.
    stack.start_worker()
    events = assert_succeeded_once(stack, job_id, attempts=2)
    resumed = [e for e in events if e["message"].startswith("resuming from checkpoint")]
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2 and resumed[0]["step"] in (8, 16)
    second_attempt_steps = [e["step"] for e in events if e["type"] == "metrics" and e["attempt"] == 2]
    assert second_attempt_steps and min(second_attempt_steps) > resumed[0]["step"]


def test_job_submitted_while_the_broker_is_down_runs_when_it_is_back(fault_stack: Stack) -> None:
    from api.main import create_app

    stack = fault_stack
    # A second API process on the same database whose broker is down (nothing listens on the port).
    down = stack.settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{_closed_port()}/0", "reconcile_interval_seconds": 0}
    )
    with TestClient(create_app(down), headers=bearer(stack.api_key)) as api_with_broker_down:
        response = api_with_broker_down.post(
            "/jobs",
            json={
                "dataset_id": stack.extra["dataset_id"],
                "hyperparameters": {**TRAIN, "max_steps": 4},
                "evaluation": {"enabled": False},
            },
        )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    # The broker "comes back": the API that can reach it re-sends the queued job from SQL.
    assert_succeeded_once(stack, job["id"], attempts=1)


def test_job_committed_but_never_sent_is_dispatched_by_the_reconciler(fault_stack: Stack) -> None:
    stack = fault_stack
    # What an API killed between its commit and its send leaves behind: a queued row and no message.
    spec = JobSpec(
        dataset_id=stack.extra["dataset_id"], hyperparameters={**TRAIN, "max_steps": 4}, evaluation={"enabled": False}
    )
    with session_scope(stack.settings.database_url) as s:
        job = jobs_repo.add_job(
            s,
            Job(
                tenant_id=DEFAULT_TENANT_ID,
                base_model=stack.settings.served_model_name,
                dataset_id=spec.dataset_id,
                method=spec.method,
                hyperparameters=spec.hyperparameters.model_dump(mode="json"),
                evaluation=spec.evaluation.model_dump(mode="json"),
                status=JobStatus.queued,
                max_attempts=stack.settings.max_attempts,
            ),
        )
        jobs_repo.add_event(s, JobEvent(job_id=job.id, kind="status", message="job queued"))
        leases.mark_dispatched(s, Job, job.id)  # as commit_and_send does before its commit
        job_id = job.id
    assert_succeeded_once(stack, job_id, attempts=1)


def test_duplicate_delivery_is_turned_away_by_the_lease(fault_stack: Stack) -> None:
    stack = fault_stack
    assert stack.worker_log is not None
    dup_log = stack.worker_log.with_name("worker-dup.log")
    logs = (stack.worker_log, dup_log)
    dup = stack.spawn_worker(dup_log, name="dup")
    try:
        # Ready to claim at once: the worker's fork server has preloaded (an attempt waits for that before it claims).
        wait_until(
            lambda: "dup@" in dup_log.read_text() and ": preloaded in" in dup_log.read_text(),
            timeout=120,
            what="the second worker to be ready",
        )
        job_id = submit_job(stack, max_steps=40)
        stack.wait_for_job(
            job_id, condition=lambda j: j["status"] == "running" and j["progress"]["step"] >= 1, timeout=90
        )

        def turned_away() -> int:
            return sum(log.read_text().count(f"job {job_id}: not claimable") for log in logs)

        already = turned_away()
        send(stack.settings, Job, job_id)
        send(stack.settings, Job, job_id)
        # The idle worker takes both messages while the first attempt trains, and finds the lease held.
        wait_until(lambda: turned_away() >= already + 2, timeout=60, what="both duplicates to be turned away")
        assert stack.client.get(f"/jobs/{job_id}").json()["status"] == "running"
        assert_succeeded_once(stack, job_id, attempts=1)
        assert not any("resuming from checkpoint" in e["message"] for e in job_events(stack, job_id))
    finally:
        dup.send_signal(signal.SIGTERM)
        try:
            dup.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dup.kill()
            dup.wait()


@dataclass
class RedisServer:
    """A private `redis-server` on a loopback port that a test may kill; nothing persisted, so a restart loses
    every message and every unacked delivery, as a Redis without AOF does."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, f"redis-server exited; log: {self.log}"
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, timeout=15, what="redis-server to answer PING")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to connected clients."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None


@pytest.fixture
@requires("stack")
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), log=tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_redis_restarted_mid_job_the_job_completes_once_and_the_worker_reconnects(
    private_redis: RedisServer, tmp_path: Path, model_dir: Path, demo_files: tuple[Path, Path]
) -> None:
    with running_stack(
        "postgres", tmp_path / "stack", model_dir, broker_url=private_redis.url, **FAST_RECOVERY
    ) as stack:
        upload_dataset(stack, demo_files)
        job_id = submit_job(stack, max_steps=60)  # about 5 s of training left after the restart below
        stack.wait_for_job(
            job_id, condition=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2, timeout=90
        )

        # The worker holds the job's unacked message; the new Redis has no trace of it, nor of the queue.
        private_redis.kill()
        private_redis.start()
        assert stack.client.get(f"/jobs/{job_id}").json()["status"] == "running"
        assert_succeeded_once(stack, job_id, attempts=1)

        # The same worker process consumes from the new Redis.
        assert stack.worker is not None and stack.worker.poll() is None
        assert_succeeded_once(stack, submit_job(stack, max_steps=4), attempts=1)


_RECEIVED = re.compile(
    r"^\[([0-9-]+ [0-9:]+,[0-9]+): INFO/MainProcess\] Task tuneserve\.train\[([0-9a-f-]+)\] received", re.MULTILINE
)


def _train_deliveries(log: Path) -> list[tuple[datetime, str]]:
    """(when, task id) of every train message this worker's log says it received."""
    return [
        (datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f"), task_id)
        for when, task_id in _RECEIVED.findall(log.read_text())
    ]


def test_a_redelivery_after_the_visibility_timeout_is_turned_away_by_the_lease(
    private_redis: RedisServer, tmp_path: Path, model_dir: Path, demo_files: tuple[Path, Path]
) -> None:
    """A visibility timeout shorter than the job: Redis itself gives the training worker's unacked message to the
    other, idle worker (kombu's restore sweep, which that worker runs), and the lease turns the delivery away.

    A private Redis: kombu's unacked index is one per Redis database and every idle worker sweeps all of it with
    its own timeout, so 2 s workers on the shared test database would re-deliver other stacks' messages as well.
    """
    timeout = 2
    # The reconciler re-sends a queued job only after 60 s, and the job is claimed at once: the one message the API
    # sends is the only way its id reaches the workers, so a second delivery can only be the broker's.
    overrides = {**FAST_RECOVERY, "requeue_after_seconds": 60, "broker_visibility_timeout_seconds": timeout}
    with running_stack("postgres", tmp_path / "stack", model_dir, broker_url=private_redis.url, **overrides) as stack:
        upload_dataset(stack, demo_files)
        # settings_env does not forward the setting: restart running_stack's worker with it, and add a second one.
        assert stack.worker_log is not None
        stack.stop_worker()
        stack.env["TUNESERVE_BROKER_VISIBILITY_TIMEOUT_SECONDS"] = str(timeout)
        stack.worker_log = stack.worker_log.with_name("worker-a.log")
        stack.start_worker()
        other_log = stack.worker_log.with_name("worker-b.log")
        other = stack.spawn_worker(other_log, name="other")
        logs = (stack.worker_log, other_log)
        try:
            for log in logs:
                wait_until(
                    lambda log=log: log.exists() and " ready." in log.read_text(),
                    timeout=60,
                    what=f"{log.name}'s worker to be ready",
                )
            job_id = submit_job(stack, max_steps=60)

            def turned_away(log: Path) -> int:
                return log.read_text().count(f"job {job_id}: not claimable")

            # Both workers idle on the queue; one takes the message and claims the job. The other sweeps the unacked
            # index every second (unacked_restore_interval 1, throttle 1) and, once the message is older than the
            # timeout, Redis gives it the same message again.
            wait_until(
                lambda: sum(map(turned_away, logs)) >= 1,
                timeout=60,
                what="Redis to re-deliver the training worker's message to the idle worker",
            )
            job = stack.client.get(f"/jobs/{job_id}").json()
            assert job["status"] == "running" and job["progress"]["step"] < 60, job  # the first attempt still trains

            assert_succeeded_once(stack, job_id, attempts=1)
            assert not any("resuming from checkpoint" in e["message"] for e in job_events(stack, job_id))
            # Exactly one redelivery: the worker that got it acked it, so nothing was left to restore after.
            assert sorted(map(turned_away, logs)) == [0, 1], [log.read_text() for log in logs]
            # Either delivery may be the one that claims: a worker that got the message while its fork server was
            # still preloading claims only after the preload, and by then the other worker may have the redelivery and
            # the job. What the broker promises is the same message twice, a visibility timeout apart.
            deliveries = sorted(delivery for log in logs for delivery in _train_deliveries(log))
            [(first_at, first_id), (again_at, again_id)] = deliveries
            assert again_id == first_id  # the same message (task id), not a second send
            gap = (again_at - first_at).total_seconds()
            assert gap >= timeout - 0.5, f"re-delivered {gap:.2f} s after the first delivery"
            # Both workers still consume, and the broker holds nothing for this job any more.
            assert stack.worker is not None and stack.worker.poll() is None and other.poll() is None
            broker = redis.Redis(host="127.0.0.1", port=private_redis.port)
            try:
                assert broker.hlen("unacked") == 0 and broker.llen(stack.settings.queue_name) == 0
            finally:
                broker.close()
        finally:
            stop_process_group(other)
