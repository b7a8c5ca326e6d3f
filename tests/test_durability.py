"""Durability: every answer is already true, and no job, adapter or file is ever stranded.

Commit-before-respond on every writing route (create, then read at once, many times, on both stacks); the
lease helpers settle cancel-requested work whatever crashes around it; a real worker SIGKILLed after a cancel,
a database that vanishes under a training job's heartbeat (a TCP proxy between the worker and Postgres that
the test cuts), a worker killed right after a job's success, staging and publish leftovers of SIGKILLed
processes, and the SQLite broker's delivered messages are all settled by the reconciler and its sweeper.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update

from core.db import get_engine, session_scope
from core.models import (
    DEFAULT_TENANT_ID,
    Adapter,
    AdapterOperation,
    Dataset,
    Evaluation,
    Job,
    JobStatus,
    WorkStatus,
    utcnow,
)
from core.queue import TASKS
from core.reconcile import reconcile_once
from core.repository import jobs as jobs_repo
from core.repository import leases
from core.storage import Store
from core.sweeper import message_record
from tests.support.adapters import files_of, peft_adapter, tar_gz
from tests.support.jobs import FAST_RECOVERY, TRAIN, assert_succeeded_once, submit_job, training_children, wait_until
from tests.support.markers import requires
from tests.support.paths import ROOT
from tests.support.processes import api_command, free_port, start_in_own_group, stop_process_group
from tests.support.stack import Stack, bearer, mint_api_key, running_stack

DURABLE = {**FAST_RECOVERY, "sweep_min_age_seconds": 2, "sweep_interval_seconds": 1.0}


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
@requires("stack")
def durable_stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    model_dir: Path,
    demo_files: tuple[Path, Path],
) -> Iterator[Stack]:
    kind = request.param
    with running_stack(kind, tmp_path_factory.mktemp(f"durable-{kind}"), model_dir, **DURABLE) as stack:
        train, test = demo_files
        with train.open("rb") as f, test.open("rb") as t:
            response = stack.client.post(
                "/datasets", files={"file": ("train.jsonl", f), "test_file": ("test.jsonl", t)}
            )
        assert response.status_code == 201, response.text
        stack.extra["dataset_id"] = response.json()["id"]
        yield stack


# --- commit before respond ---------------------------------------------------------------------------------

SMALL_DATASET = b"".join(
    b'{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a%d"}]}\n' % (i, i)
    for i in range(8)
)


@pytest.fixture
def api_server(durable_stack: Stack, tmp_path: Path) -> Iterator[httpx.Client]:
    """The API as a real uvicorn process on the stack's settings: the race lives between the server sending a
    response and running what follows it, which the in-process TestClient does not show."""
    stack = durable_stack
    port = free_port()
    env = {**stack.env, "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "0"}
    server = start_in_own_group(api_command(port, log_level="warning"), env=env, log=tmp_path / "api.log", cwd=ROOT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=bearer(stack.api_key), timeout=60)

    def answers() -> bool:
        assert server.poll() is None, (tmp_path / "api.log").read_text()
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout=60, what="uvicorn")
        yield client
    finally:
        client.close()
        stop_process_group(server)


def test_create_then_read_at_once_never_misses(
    durable_stack: Stack, api_server: httpx.Client, model_dir: Path, tmp_path: Path
) -> None:
    """Each create answered 2xx is visible to the very next request: datasets, jobs, evaluations, imports, their
    canary operations, deletes and API keys, 25 rounds each (before the fix: 5 misses in 40 on datasets)."""
    stack = durable_stack
    client = api_server
    stack.stop_worker()  # the work stays queued: this test is about the API's answers only
    archive = tar_gz(files_of(peft_adapter(str(model_dir), tmp_path / "adapter", trained=False)))
    misses: list[str] = []
    made: dict[type, list[str]] = {Job: [], Evaluation: [], AdapterOperation: []}
    try:
        for i in range(25):
            dataset = client.post("/datasets", files={"file": (f"d{i}.jsonl", io.BytesIO(SMALL_DATASET))})
            assert dataset.status_code == 201, dataset.text
            dataset_id = dataset.json()["id"]
            if client.get(f"/datasets/{dataset_id}").status_code != 200:
                misses.append(f"GET dataset {i}")
            job = client.post(
                "/jobs",
                json={"dataset_id": dataset_id, "hyperparameters": {"max_steps": 1}, "evaluation": {"enabled": False}},
            )
            if job.status_code != 201:
                misses.append(f"POST /jobs naming dataset {i}: {job.status_code}")
                continue
            made[Job].append(job.json()["id"])
            if client.get(f"/jobs/{job.json()['id']}").status_code != 200:
                misses.append(f"GET job {i}")
            evaluation = client.post(
                "/evaluations", json={"dataset_id": stack.extra["dataset_id"], "split": "test", "max_examples": 1}
            )
            assert evaluation.status_code == 201, evaluation.text
            made[Evaluation].append(evaluation.json()["id"])
            if client.get(f"/evaluations/{evaluation.json()['id']}").status_code != 200:
                misses.append(f"GET evaluation {i}")
            if i % 5 == 0:  # imports cost a hash of every file: fewer rounds
                imported = client.post("/adapters", files={"file": ("a.tar.gz", io.BytesIO(archive))})
                assert imported.status_code == 202, imported.text  # accepted: its canary runs on a worker
                name = imported.json()["name"]
                if client.get(f"/adapters/{name}").status_code != 200:
                    misses.append(f"GET imported adapter {i}")
                deleted = client.delete(f"/adapters/{name}")
                assert deleted.status_code == 200, deleted.text
                if client.get(f"/adapters/{name}").status_code != 404:  # a deleted adapter is gone at once
                    misses.append(f"GET deleted adapter {i}")
            key = mint_api_key(stack.settings)
            if client.get("/jobs", headers=bearer(key)).status_code != 200:
                misses.append(f"new key {i}")
        assert misses == []
    finally:
        with session_scope(stack.settings.database_url) as s:
            made[AdapterOperation] = list(
                s.scalars(select(AdapterOperation.id).where(AdapterOperation.status == WorkStatus.queued))
            )
            for model, ids in made.items():
                for record_id in ids:
                    leases.request_cancel(s, model, record_id)
        stack.start_worker()


# --- cancel, retry and lease loss: one helper for every kind -----------------------------------------------


@pytest.mark.parametrize("model", list(TASKS), ids=lambda m: m.__tablename__)
def test_a_cancel_between_the_supervisors_read_and_its_retry_ends_cancelled(durable_stack: Stack, model: Any) -> None:
    stack = durable_stack
    with session_scope(stack.settings.database_url) as s:
        record_id = _queued_record(s, stack, model)
    with session_scope(stack.settings.database_url) as s:
        assert leases.claim(s, model, record_id, owner="w1", lease_seconds=60)
    with session_scope(stack.settings.database_url) as s:
        leases.request_cancel(s, model, record_id)  # lands after the supervisor decided to retry
    with session_scope(stack.settings.database_url) as s:
        assert leases.release_for_retry(s, model, record_id, owner="w1", reason="child died") == "cancelled"
    with session_scope(stack.settings.database_url) as s:
        row = leases.get(s, model, record_id)
        assert row is not None
        assert row.status.value == "cancelled" and row.lease_owner is None
        assert not leases.claim(s, model, record_id, owner="w2", lease_seconds=60)


@pytest.mark.parametrize("model", list(TASKS), ids=lambda m: m.__tablename__)
def test_cancel_requested_work_whose_lease_expired_is_settled_cancelled(durable_stack: Stack, model: Any) -> None:
    stack = durable_stack
    with session_scope(stack.settings.database_url) as s:
        record_id = _queued_record(s, stack, model)
    with session_scope(stack.settings.database_url) as s:
        assert leases.claim(s, model, record_id, owner="a-dead-worker", lease_seconds=60)
        leases.request_cancel(s, model, record_id)
        s.execute(update(model).where(model.id == record_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope(stack.settings.database_url) as s:
        due = leases.claim_redispatch(s, model, now=utcnow(), requeue_after_seconds=1)
        assert record_id not in due  # never re-sent: nobody may run it
        assert leases.settle_cancelled(s, model, now=utcnow()) == [record_id]
    with session_scope(stack.settings.database_url) as s:
        cancelled = leases.get(s, model, record_id)
        assert cancelled is not None and cancelled.status.value == "cancelled"


def _queued_record(s: Any, stack: Stack, model: Any) -> str:
    if model is Job:
        row: Any = Job(
            tenant_id=DEFAULT_TENANT_ID,
            base_model="m",
            dataset_id=stack.extra["dataset_id"],
            method="lora",
            hyperparameters={},
            status=JobStatus.queued,
            max_attempts=3,
        )
    elif model is Evaluation:
        row = Evaluation(
            tenant_id=DEFAULT_TENANT_ID,
            dataset_id=stack.extra["dataset_id"],
            split="test",
            base_model="m",
            metrics=[],
            batch_size=1,
            max_new_tokens=1,
            status=WorkStatus.queued,
            max_attempts=3,
        )
    else:
        row = AdapterOperation(
            tenant_id=DEFAULT_TENANT_ID,
            kind="derive",
            source_adapter="none",
            scale=1.0,
            status=WorkStatus.queued,
            max_attempts=3,
        )
    s.add(row)
    s.flush()
    # Not for the real worker: it would try to run these. Sent records only; this one never is.
    s.execute(
        update(model).where(model.id == row.id).values(dispatched_at=utcnow() + timedelta(days=1), dispatch_count=99)
    )
    return str(row.id)


def test_a_cancelled_job_whose_worker_was_sigkilled_ends_cancelled(durable_stack: Stack) -> None:
    """Before: `running, cancel_requested` for good, re-sent every round, counted against the active-job limit."""
    stack = durable_stack
    job_id = submit_job(stack, max_steps=400)
    stack.wait_for_job(job_id, condition=lambda j: j["status"] == "running" and j["progress"]["step"] >= 1, timeout=120)
    stack.stop_worker(signal.SIGKILL)
    wait_until(lambda: not training_children(job_id), timeout=20, what="the child to die with its worker")
    response = stack.client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "running"
    stack.start_worker()
    job = stack.wait_for_job(job_id, timeout=60)
    assert job["status"] == "cancelled", job
    with session_scope(stack.settings.database_url) as s:
        assert job_id not in [
            j.id for j in jobs_repo.list_jobs(s, DEFAULT_TENANT_ID, limit=100, after=None, status=JobStatus.running)[0]
        ]
        assert s.scalar(select(func.count()).select_from(Adapter).where(Adapter.job_id == job_id)) == 0
    wait_until(
        lambda: not Store(stack.settings).job_dir(job_id).exists(), timeout=10, what="its checkpoints to be freed"
    )


# --- a database that vanishes under the heartbeat ----------------------------------------------------------


class CuttableProxy:
    """A TCP proxy in front of Postgres that the test can cut: open connections reset, new ones refused."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut_for(self, seconds: float) -> None:
        self.cut.set()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.sockets.clear()
        time.sleep(seconds)
        self.cut.clear()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def worker_behind_proxy(durable_stack: Stack) -> Iterator[tuple[Stack, CuttableProxy]]:
    stack = durable_stack
    if stack.kind != "postgres":
        pytest.skip("a network cut between the worker and its database needs a database server")
    proxy = CuttableProxy(5432)
    stack.stop_worker()
    url = stack.settings.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert url != stack.settings.database_url
    original_env = stack.env
    stack.env = {**original_env, "TUNESERVE_DATABASE_URL": url}
    stack.start_worker()
    try:
        yield stack, proxy
    finally:
        stack.stop_worker()
        stack.env = original_env
        stack.start_worker()
        proxy.close()


class ChildCounter:
    """Samples the training children of a job every 0.2 s: the most seen alive at once."""

    def __init__(self, job_id: str) -> None:
        self.job_id, self.most, self.stopped = job_id, 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            self.most = max(self.most, len(training_children(self.job_id)))


def test_a_brief_database_outage_under_the_heartbeat_does_not_end_the_attempt(worker_behind_proxy: Any) -> None:
    stack, proxy = worker_behind_proxy
    job_id = submit_job(stack, max_steps=60)
    stack.wait_for_job(job_id, condition=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2, timeout=120)
    proxy.cut_for(1.5)  # the supervisor tolerates up to the lease (6 s) less two heartbeats since its last renewal
    assert_succeeded_once(stack, job_id, attempts=1)


def test_a_long_database_outage_stops_the_child_before_the_lease_expires(worker_behind_proxy: Any) -> None:
    """Before: renew() raised, the task ended and its child trained on as an orphan beside the next attempt."""
    stack, proxy = worker_behind_proxy
    job_id = submit_job(stack, max_steps=80)
    stack.wait_for_job(job_id, condition=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2, timeout=120)
    counter = ChildCounter(job_id)
    children = training_children(job_id)
    proxy.cut_for(12)  # longer than the lease: the supervisor must have stopped its child by now
    assert not any(_alive(pid) for pid in children), "the child outlived its supervisor's lease"
    assert_succeeded_once(stack, job_id, attempts=2)
    counter.stopped.set()
    assert counter.most == 1, "two attempts trained at once"
    _assert_adapter_files_match_sql(stack, job_id)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _assert_adapter_files_match_sql(stack: Stack, job_id: str) -> None:
    from core.storage import hash_dir

    with session_scope(stack.settings.database_url) as s:
        adapter = s.scalars(select(Adapter).where(Adapter.job_id == job_id)).one()
    files, _ = hash_dir(Store(stack.settings).resolve(adapter.path))
    assert files == adapter.files


# --- work that must start, leftovers that must go ----------------------------------------------------------


def test_a_worker_killed_right_after_a_jobs_success_still_gets_its_evaluations_run(durable_stack: Stack) -> None:
    stack = durable_stack
    body = {
        "dataset_id": stack.extra["dataset_id"],
        "hyperparameters": {**TRAIN, "max_steps": 4},
        "evaluation": {"enabled": True, "max_examples": 4, "max_new_tokens": 4},
    }
    response = stack.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    stack.wait_for_job(job_id, until={"succeeded"}, timeout=180)
    stack.stop_worker(signal.SIGKILL)  # at once: whatever the supervisor had left to do after the success
    with session_scope(stack.settings.database_url) as s:
        evaluations = list(s.scalars(select(Evaluation).where(Evaluation.job_id == job_id)))
    assert {e.role for e in evaluations} == {"base", "adapter"}  # committed with the success itself
    stack.start_worker()
    wait_until(lambda: _evaluation_statuses(stack, job_id) == {"succeeded"}, timeout=240, what="both evaluations")


def test_the_sweeper_starts_the_evaluations_a_succeeded_job_never_got(durable_stack: Stack) -> None:
    """A job that succeeded before evaluations were planned in its success (or whose rows were lost)."""
    stack = durable_stack
    job_id = submit_job(stack, max_steps=2)
    stack.wait_for_job(job_id, until={"succeeded"}, timeout=180)
    with session_scope(stack.settings.database_url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                evaluation={
                    "enabled": True,
                    "max_examples": 2,
                    "max_new_tokens": 2,
                },  # an older row: defaults filled in
                finished_at=utcnow() - timedelta(seconds=60),
            )
        )
    wait_until(lambda: _evaluation_statuses(stack, job_id) == {"succeeded"}, timeout=240, what="the swept evaluations")
    assert len(_evaluations_of(stack, job_id)) == 2


def _evaluations_of(stack: Stack, job_id: str) -> list[Evaluation]:
    with session_scope(stack.settings.database_url) as s:
        return list(s.scalars(select(Evaluation).where(Evaluation.job_id == job_id)))


def _evaluation_statuses(stack: Stack, job_id: str) -> set[str]:
    rows = _evaluations_of(stack, job_id)
    return {e.status.value for e in rows} if len(rows) == 2 else set()


LEFTOVER_SCRIPT = """
import os, signal, sys
from core.settings import Settings
from core.storage import Store
store = Store(Settings())
with store.staging_dir() as staged:
    (staged / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    if sys.argv[1] == "published":
        store.publish(staged, store.adapter_dir("ft-leftover-" + sys.argv[2]))
    os.kill(os.getpid(), signal.SIGKILL)  # between staging and publish, or between publish and commit
"""


def test_leftovers_of_sigkilled_processes_are_swept_and_registered_files_are_not(durable_stack: Stack) -> None:
    stack = durable_stack
    store = Store(stack.settings)
    tag = os.urandom(4).hex()
    for where in ("staging", "published"):
        code = subprocess.run([sys.executable, "-c", LEFTOVER_SCRIPT, where, tag], cwd=ROOT, env=stack.env).returncode
        assert code == -signal.SIGKILL
    leftover = store.resolve(store.adapter_dir(f"ft-leftover-{tag}"))
    assert leftover.is_dir() and any((store.root / "tmp").iterdir())
    with session_scope(stack.settings.database_url) as s:
        registered = [store.resolve(p) for p in s.scalars(select(Adapter.path).where(Adapter.status != "deleted"))]
        datasets = [store.resolve(p) for p in s.scalars(select(Dataset.path))]
    time.sleep(stack.settings.sweep_min_age_seconds + 0.5)
    reconcile_once(stack.settings)
    assert not leftover.exists()
    assert not any((store.root / "tmp").iterdir())
    assert all(p.is_dir() for p in registered + datasets)  # old enough to sweep, but a row points at each


def test_sqlite_broker_messages_of_finished_work_are_purged(durable_stack: Stack) -> None:
    """kombu's SQL transport keeps every delivered message as an invisible row; the sweeper drops those whose
    record ended (before: 38 such rows after one session of use)."""
    stack = durable_stack
    if not stack.settings.broker_url.startswith("sqla+"):
        pytest.skip("Redis deletes a message when it is acked")
    # A message is a wake-up for the fairly next record: while earlier tests' leftover messages wait in the queue,
    # the worker may run this job on one of those, and this job's own message comes later.
    wait_until(lambda: _waiting_messages(stack) == 0, timeout=60, what="the queue to drain")
    job_id = submit_job(stack, max_steps=30)
    stack.wait_for_job(job_id, condition=lambda j: j["status"] == "running", timeout=120)
    assert (Job, job_id) in _delivered_messages(stack)  # kept while its job runs
    stack.wait_for_job(job_id, until={"succeeded"}, timeout=120)
    wait_until(lambda: _delivered_messages_of_ended_work(stack) == [], timeout=15, what="the sweeper to purge them")


def _waiting_messages(stack: Stack) -> int:
    engine = get_engine(stack.settings.broker_url.removeprefix("sqla+"))
    with engine.connect() as conn:
        if not conn.execute(text("SELECT 1 FROM sqlite_master WHERE name = 'kombu_message'")).first():
            return 0  # kombu makes its tables with the first message
        return int(conn.execute(text("SELECT count(*) FROM kombu_message WHERE visible = 1")).scalar_one())


def _delivered_messages(stack: Stack) -> list[Any]:
    engine = get_engine(stack.settings.broker_url.removeprefix("sqla+"))
    with engine.connect() as conn:
        return [
            message_record(row[0]) for row in conn.execute(text("SELECT payload FROM kombu_message WHERE visible = 0"))
        ]


def _delivered_messages_of_ended_work(stack: Stack) -> list[Any]:
    delivered = _delivered_messages(stack)
    with session_scope(stack.settings.database_url) as s:
        return [
            record
            for record in delivered
            if record is None or (row := leases.get(s, record[0], record[1])) is None or row.status.is_terminal
        ]


def test_redispatch_backs_off_so_duplicates_stay_bounded(durable_stack: Stack) -> None:
    """With no worker free, the reconciler (every 1 s, requeue after 3 s) used to send a queued job every round."""
    stack = durable_stack
    stack.stop_worker()
    try:
        job_id = submit_job(stack, max_steps=1)
        time.sleep(20)
        with session_scope(stack.settings.database_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            sends = job.dispatch_count
        # 1 + sends at 3, 6, 12 s after the first: at most 4 in 20 s (the old rule: about 7).
        assert 1 <= sends <= 4, sends
    finally:
        stack.start_worker()
    stack.wait_for_job(job_id, until={"succeeded"}, timeout=120)


def test_an_attempt_that_lost_its_lease_publishes_nothing_and_registered_files_are_never_replaced(
    durable_stack: Stack,
) -> None:
    """Before: publish moved files into place before checking the lease, and Store.publish deleted an existing
    target, so a lagging attempt could replace a committed adapter's files (serving then refused it on sha256)."""
    from worker.publishing import LeaseLost, publish_under_lease

    stack = durable_stack
    store = Store(stack.settings)
    name = f"ft-lagging-{os.urandom(4).hex()}"
    with session_scope(stack.settings.database_url) as s:
        job_id = _queued_record(s, stack, Job)
    with session_scope(stack.settings.database_url) as s:
        assert leases.claim(s, Job, job_id, owner="lagging", lease_seconds=60)
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope(stack.settings.database_url) as s:
        assert leases.claim(s, Job, job_id, owner="current", lease_seconds=60)

    def staged(content: bytes) -> Path:
        path = store.root / "tmp" / os.urandom(8).hex()
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(content)
        return path

    with pytest.raises(LeaseLost), session_scope(stack.settings.database_url) as s:
        publish_under_lease(s, store, Job, job_id, "lagging", staged(b"lagging"), name)
    assert not store.resolve(store.adapter_dir(name)).exists()

    with session_scope(stack.settings.database_url) as s:
        relative = publish_under_lease(s, store, Job, job_id, "current", staged(b"current"), name)
        s.add(
            Adapter(
                name=name,
                tenant_id=DEFAULT_TENANT_ID,
                job_id=job_id,
                base_model="m",
                method="lora",
                path=relative,
                files={"adapter_model.safetensors": "x"},
                size_bytes=7,
            )
        )
    with pytest.raises(LeaseLost), session_scope(stack.settings.database_url) as s:
        publish_under_lease(s, store, Job, job_id, "current", staged(b"again"), name)  # registered: never replaced
    assert (store.resolve(relative) / "adapter_model.safetensors").read_bytes() == b"current"
    with pytest.raises(FileExistsError):
        store.publish(staged(b"plain"), relative)
    with session_scope(stack.settings.database_url) as s:
        assert leases.finish(s, Job, job_id, owner="current", status_name="succeeded", adapter_name=name)


def test_an_attempt_past_its_time_limit_is_stopped_and_fails(durable_stack: Stack) -> None:
    stack = durable_stack
    over = stack.client.post(
        "/jobs", json={"dataset_id": stack.extra["dataset_id"], "hyperparameters": {"time_limit_seconds": 10**7}}
    )
    assert over.status_code == 422 and over.json()["error"]["param"] == "hyperparameters.time_limit_seconds"
    assert "TUNESERVE_MAX_RUNTIME_SECONDS" in over.json()["error"]["message"]
    job_id = submit_job(stack, max_steps=100_000, time_limit_seconds=8)
    job = stack.wait_for_job(job_id, timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit", job
    assert job["attempts"] == 1  # a time limit is not retried
    wait_until(lambda: not training_children(job_id), timeout=10, what="the child to be gone")


def test_a_running_evaluation_is_cancelled_and_its_child_stopped(durable_stack: Stack) -> None:
    """Evaluations could not be cancelled at all; now the supervisor stops the child after the grace period."""
    stack = durable_stack
    response = stack.client.post(
        "/evaluations",
        json={"dataset_id": stack.extra["dataset_id"], "split": "train", "batch_size": 1, "max_new_tokens": 512},
    )
    assert response.status_code == 201, response.text
    evaluation_id = response.json()["id"]
    wait_until(
        lambda: stack.client.get(f"/evaluations/{evaluation_id}").json()["status"] == "running",
        timeout=120,
        what="the evaluation to start",
    )
    cancelled = stack.client.post(f"/evaluations/{evaluation_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True
    wait_until(
        lambda: stack.client.get(f"/evaluations/{evaluation_id}").json()["status"] == "cancelled",
        timeout=stack.settings.cancel_grace_seconds + 30,
        what="the evaluation to be cancelled",
    )
    wait_until(lambda: not _evaluation_children(evaluation_id), timeout=10, what="its child to be gone")


def _evaluation_children(evaluation_id: str) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"worker.evaluation evaluation {evaluation_id}"], capture_output=True, text=True
    ).stdout
    return [int(pid) for pid in out.split()]
