"""Test fixtures: real Postgres + Redis and embedded SQLite stacks, a real Celery worker process, a tiny model.

The helpers behind them live in tests/support/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.demo_data import write_demo_dataset
from core.migrate import upgrade
from core.modelzoo import build_model
from core.settings import Settings
from tests.support.lanes import assign_lane, interrupt_on_sigterm, one_thread_per_lane
from tests.support.markers import apply_fixture_markers, requires
from tests.support.processes import free_port, stop_process_group
from tests.support.serving import SERVING_TEST_SETTINGS, ServingProcess
from tests.support.stack import Stack, bearer, mint_api_key, running_stack, settings_env, stack_settings

os.environ["HF_HUB_OFFLINE"] = "1"
one_thread_per_lane()


def pytest_configure(config: pytest.Config) -> None:
    interrupt_on_sigterm()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the lane groups into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers by fixture (tests/support/markers.py): a test using a stack fixture is marked `stack`, and so on;
    then each test's lane for `pytest -n 2 --dist loadgroup` (tests/support/lanes.py)."""
    for item in items:
        apply_fixture_markers(item)
        assign_lane(item)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=256, n_test=32, seed=0)


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


@pytest.fixture(scope="session")
@requires("stack", "serving")
def serving_stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    """The embedded stack (SQLite, Celery over SQLite; worker started on demand) plus one serving process.

    stack.extra["serving"] is the ServingProcess. The API (TestClient) reaches serving over real HTTP.
    """
    from api.main import create_app
    from core.serving_contract import serving_token

    data_dir = tmp_path_factory.mktemp("stack-serving")
    base, _ = stack_settings("sqlite", data_dir, model_dir)
    port = free_port()
    # No TUNESERVE_SERVING_TOKEN: the embedded mode's token, generated in data_dir and read by the API and serving.
    serving_values = dict(SERVING_TEST_SETTINGS, serving_port=port, serving_url=f"http://127.0.0.1:{port}")
    settings = Settings(**{**base.model_dump(exclude={"serving_url"}), **serving_values})
    settings.ensure_dirs()
    token = serving_token(settings)
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
        stop_process_group(serving.process)
