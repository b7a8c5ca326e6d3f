"""Test fixtures: real Postgres + Redis and embedded SQLite stacks, a real Celery worker process, a tiny model."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from core.demo_data import write_demo_dataset
from core.migrate import upgrade
from core.modelzoo import build_model
from core.settings import Settings
from tests.support.markers import apply_fixture_markers, requires

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TUNESERVE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNESERVE_TEST_REDIS", "redis://127.0.0.1:6379/15")
TERMINAL = {"succeeded", "failed", "cancelled"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers by fixture (tests/support/markers.py): a test using a stack fixture is marked `stack`, and so on."""
    for item in items:
        apply_fixture_markers(item)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=256, n_test=32, seed=0)


def create_pg_database() -> str:
    name = f"tuneserve_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_url(name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def die_with_parent() -> None:
    """Runs in a test's child process: the kernel sends it SIGTERM if pytest dies without its teardown."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Stack:
    """One deployment under test: settings, the API in-process, a Celery worker as a real process."""

    kind: str
    settings: Settings
    env: dict[str, str]
    client: TestClient
    api_key: str = ""
    worker: subprocess.Popen[bytes] | None = None
    worker_log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start_worker(self) -> None:
        assert self.worker_log is not None
        self.worker = self.spawn_worker(self.worker_log)

    def spawn_worker(self, log_path: Path, name: str = "celery") -> subprocess.Popen[bytes]:
        """A Celery worker process (its own process group) on this stack's queue; the caller stops it."""
        log = log_path.open("ab")
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "-Q",
                self.settings.queue_name,
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"{name}@%h",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        if self.worker is None:
            return
        try:
            os.killpg(self.worker.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
        self.worker = None

    def wait_for_job(
        self, job_id: str, *, until: set[str] | None = None, timeout: float = 240, condition: Any = None
    ) -> dict[str, Any]:
        """Poll the job until it reaches one of `until` (default: a terminal state) or `condition(job)`."""
        until = until or TERMINAL
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["status"] in until or (condition is not None and condition(job)):
                return job
            if self.worker is not None and self.worker.poll() is not None:
                raise AssertionError(f"worker exited with {self.worker.returncode}; log: {self.worker_log}")
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} did not reach {until} in {timeout}s: {job}")


def _stack_settings(kind: str, data_dir: Path, model_dir: Path, **overrides: Any) -> tuple[Settings, list[str]]:
    cleanup: list[str] = []
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "base_model": str(model_dir),
        "queue_name": f"tuneserve-test-{secrets.token_hex(4)}",
        "heartbeat_seconds": 1.0,
        "lease_seconds": 20,
        "cancel_grace_seconds": 20.0,
        "event_every_steps": 2,
        "reconcile_interval_seconds": 2.0,
        "requeue_after_seconds": 60,
        "max_upload_bytes": 2 * 1024 * 1024,
    }
    if kind == "postgres":
        name = create_pg_database()
        cleanup.append(name)
        values["database_url"] = pg_url(name)
        values["broker_url"] = REDIS_URL
    return Settings(**{**values, **overrides}), cleanup


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "TUNESERVE_DATA_DIR": str(settings.data_dir),
            "TUNESERVE_DATABASE_URL": settings.database_url,
            "TUNESERVE_BROKER_URL": settings.broker_url,
            "TUNESERVE_BASE_MODEL": settings.base_model,
            "TUNESERVE_QUEUE_NAME": settings.queue_name,
            "TUNESERVE_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "TUNESERVE_LEASE_SECONDS": str(settings.lease_seconds),
            "TUNESERVE_CANCEL_GRACE_SECONDS": str(settings.cancel_grace_seconds),
            "TUNESERVE_EVENT_EVERY_STEPS": str(settings.event_every_steps),
        }
    )
    return env


def mint_api_key(settings: Settings, tenant: str = "default", *, new_tenant: bool = False) -> str:
    """A bearer key of `tenant` (made first when new_tenant), minted as `tuneserve admin create-key` does."""
    from core.auth import create_tenant, mint_key
    from core.db import session_scope

    with session_scope(settings.database_url) as session:
        if new_tenant:
            create_tenant(session, tenant)
        return mint_key(session, tenant, label="tests").secret


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@contextmanager
def running_stack(kind: str, data_dir: Path, model_dir: Path, **overrides: Any) -> Iterator[Stack]:
    """A migrated database, the API in-process (its reconciler running) and one worker process."""
    from api.main import create_app

    settings, pg_databases = _stack_settings(kind, data_dir, model_dir, **overrides)
    settings.ensure_dirs()
    try:
        upgrade(settings.database_url)
        api_key = mint_api_key(settings)
        with TestClient(create_app(settings), headers=bearer(api_key)) as client:
            stack = Stack(
                kind=kind,
                settings=settings,
                env=settings_env(settings),
                client=client,
                api_key=api_key,
                worker_log=data_dir / "worker.log",
            )
            stack.start_worker()
            try:
                yield stack
            finally:
                stack.stop_worker()
    finally:
        for name in pg_databases:
            drop_pg_database(name)


@pytest.fixture(scope="session", params=["postgres", "sqlite"])
@requires("stack")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    """A full deployment: (a) Postgres + Redis, (b) SQLite + Celery over SQLite."""
    kind = request.param
    with running_stack(kind, tmp_path_factory.mktemp(f"stack-{kind}"), model_dir) as stack:
        yield stack


@pytest.fixture(scope="module")
def paused_stack(stack: Stack) -> Iterator[Stack]:
    """The stack with its worker stopped for a module, so new jobs stay queued; cancelled and restarted after."""
    from core.db import session_scope
    from core.models import Job, JobStatus
    from core.repository import jobs as jobs_repo
    from core.repository import leases

    stack.stop_worker()
    try:
        yield stack
    finally:
        with session_scope(stack.settings.database_url) as s:
            queued, _ = jobs_repo.list_jobs(s, None, limit=1000, after=None, status=JobStatus.queued)
            for job in queued:
                leases.request_cancel(s, Job, job.id)
        stack.start_worker()


@pytest.fixture(scope="session")
def demo_dataset(stack: Stack, demo_files: tuple[Path, Path]) -> dict[str, Any]:
    """The demo task uploaded once per stack, with its test split."""
    train, test = demo_files
    with train.open("rb") as f, test.open("rb") as t:
        response = stack.client.post("/datasets", files={"file": ("train.jsonl", f), "test_file": ("test.jsonl", t)})
    assert response.status_code == 201, response.text
    return response.json()


@dataclass
class ServingProcess:
    """`python -m serving` started on a stack's settings: the one vLLM engine of a test session."""

    url: str
    token: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> None:
        """Spawn serving (its own process group) and return once /health answers: the port opens after the engine."""
        import httpx

        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serving"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        headers, deadline = {"X-Tuneserve-Serving-Token": self.token}, time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"serving exited with {self.process.returncode}; log: {self.log}")
            try:
                if httpx.get(f"{self.url}/health", headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serving not ready in 300 s; log: {self.log}")
            time.sleep(0.5)

    def restart(self) -> None:
        """Stop serving (SIGTERM, as a deploy does) and start a fresh engine on the same port and settings."""
        _stop_process_group(self.process)
        self.start()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Small enough for 2 CPU cores: max_cpu_loras below the number of adapters the tests make, so the LRU churns.
SERVING_TEST_SETTINGS: dict[str, Any] = {
    "max_lora_rank": 8,
    "serving_max_loras": 2,
    "serving_max_cpu_loras": 4,
    "serving_max_model_len": 512,
    "serving_max_prompt_tokens": 384,
    "serving_max_tokens": 64,
    "serving_max_num_seqs": 32,
    "serving_kv_cache_gib": 1,
    "serving_dtype": "float32",
}


@pytest.fixture(scope="session")
@requires("stack", "serving")
def serving_stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    """The embedded stack (SQLite, Celery over SQLite; worker started on demand) plus one serving process.

    stack.extra["serving"] is the ServingProcess. The API (TestClient) reaches serving over real HTTP.
    """
    from api.main import create_app

    data_dir = tmp_path_factory.mktemp("stack-serving")
    base, _ = _stack_settings("sqlite", data_dir, model_dir)
    port, token = _free_port(), secrets.token_hex(8)
    serving_values = dict(
        SERVING_TEST_SETTINGS, serving_port=port, serving_token=token, serving_url=f"http://127.0.0.1:{port}"
    )
    settings = Settings(**{**base.model_dump(exclude={"serving_url", "serving_max_prompt_tokens"}), **serving_values})
    settings.ensure_dirs()
    upgrade(settings.database_url)
    env = settings_env(settings)
    env.update({f"TUNESERVE_{k.upper()}": str(v) for k, v in serving_values.items()})
    serving = ServingProcess(url=settings.serving_url, token=token, env=env, log=data_dir / "serving.log")
    try:
        serving.start()
        api_key = mint_api_key(settings)
        with TestClient(create_app(settings), headers=bearer(api_key)) as client:
            stack = Stack(
                kind="sqlite",
                settings=settings,
                env=env,
                client=client,
                api_key=api_key,
                worker_log=data_dir / "worker.log",
                extra={"serving": serving},
            )
            try:
                yield stack
            finally:
                stack.stop_worker()
    finally:
        _stop_process_group(serving.process)


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process and its children (vLLM's engine core), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
