"""A deployment under test: settings, the API in-process, a Celery worker as a real process."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from core.migrate import upgrade
from core.settings import Settings
from tests.support.databases import create_pg_database, drop_pg_database, pg_url
from tests.support.paths import REDIS_URL, ROOT, TERMINAL
from tests.support.processes import start_in_own_group, stop_process_group, worker_command


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
        argv = worker_command(self.settings.queue_name, name=name)
        return start_in_own_group(argv, env=self.env, log=log_path, cwd=ROOT)

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        if self.worker is not None:
            stop_process_group(self.worker, sig)
            self.worker = None

    def wait_for_job(
        self, job_id: str, *, until: Collection[str] = TERMINAL, timeout: float = 240, condition: Any = None
    ) -> dict[str, Any]:
        """Poll the job until it reaches one of `until` (default: a terminal state) or `condition(job)`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["status"] in until or (condition is not None and condition(job)):
                return job
            if self.worker is not None and self.worker.poll() is not None:
                raise AssertionError(f"worker exited with {self.worker.returncode}; log: {self.worker_log}")
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} did not reach {until} in {timeout}s: {job}")


def stack_settings(kind: str, data_dir: Path, model_dir: Path, **overrides: Any) -> tuple[Settings, list[str]]:
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

    settings, pg_databases = stack_settings(kind, data_dir, model_dir, **overrides)
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
