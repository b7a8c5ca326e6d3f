"""`GET /metrics` on the API (requests, jobs by status, queue depth) and the serving process's metrics module."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from core.migrate import upgrade
from core.settings import Settings
from tests.support.markers import requires
from tests.support.paths import REDIS_URL
from tests.support.stack import bearer, mint_api_key


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the scrape, keyed by (name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(params=["sqlite", "redis"])
@requires("stack")
def api(request: pytest.FixtureRequest, tmp_path: Path, model_dir: Path) -> Iterator[tuple[TestClient, Settings]]:
    """The API on SQLite with either broker, and no worker: a job sent stays in the queue."""
    # metrics_cache_seconds 0: each scrape reads SQL and the broker afresh, so a test sees its own changes at once
    # (the cache has its own test below).
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "base_model": str(model_dir),
        "reconcile_interval_seconds": 0,
        "queue_name": f"tuneserve-metrics-{secrets.token_hex(4)}",
        "metrics_cache_seconds": 0,
    }
    if request.param == "redis":
        values["broker_url"] = REDIS_URL
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with TestClient(create_app(settings), headers=bearer(mint_api_key(settings))) as client:
        yield client, settings
    if request.param == "redis":
        redis.Redis.from_url(REDIS_URL).delete(settings.queue_name)


def test_metrics_count_requests_by_route_template_and_status(api: tuple[TestClient, Settings]) -> None:
    client, _ = api
    before = scrape(client)
    assert sample(before, "tuneserve_http_requests_total", method="GET", route="/healthz", status="200") is None
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    assert client.get("/jobs/ftjob-does-not-exist").status_code == 404
    assert client.get("/jobs/ftjob-another-one").status_code == 404
    assert client.get("/no/such/path").status_code == 404

    after = scrape(client)
    assert sample(after, "tuneserve_http_requests_total", method="GET", route="/healthz", status="200") == 3
    # The template, not the raw path: both unknown job ids land in one series.
    assert sample(after, "tuneserve_http_requests_total", method="GET", route="/jobs/{job_id}", status="404") == 2
    assert sample(after, "tuneserve_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert not any("ftjob-does-not-exist" in str(labels) for _, labels in after)
    assert sample(after, "tuneserve_http_request_duration_seconds_count", method="GET", route="/healthz") == 3
    assert (
        sample(after, "tuneserve_http_request_duration_seconds_bucket", method="GET", route="/healthz", le="+Inf") == 3
    )
    # The first scrape is counted once it has been answered.
    assert sample(after, "tuneserve_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_jobs_by_status_and_queue_depth_follow_the_registry_and_the_broker(
    api: tuple[TestClient, Settings], demo_files: tuple[Path, Path]
) -> None:
    client, settings = api
    before = scrape(client)
    assert sample(before, "tuneserve_metrics_source_up", source="database") == 1
    assert sample(before, "tuneserve_metrics_source_up", source="broker") == 1
    for status in ("validating_files", "queued", "running", "succeeded", "failed", "cancelled"):
        assert sample(before, "tuneserve_jobs", status=status) == 0
    assert sample(before, "tuneserve_queue_depth", queue=settings.queue_name) == 0

    train, test = demo_files
    with train.open("rb") as f, test.open("rb") as t:
        dataset = client.post("/datasets", files={"file": ("train.jsonl", f), "test_file": ("test.jsonl", t)}).json()
    job_ids = []
    for _ in range(2):
        response = client.post("/jobs", json={"dataset_id": dataset["id"], "hyperparameters": {"max_steps": 5}})
        assert response.status_code == 201, response.text
        job_ids.append(response.json()["id"])
    assert client.post(f"/jobs/{job_ids[1]}/cancel").json()["status"] == "cancelled"

    after = scrape(client)
    assert sample(after, "tuneserve_jobs", status="queued") == 1
    assert sample(after, "tuneserve_jobs", status="cancelled") == 1
    # No worker consumes the queue: both messages wait there (the cancelled job's worker would just exit).
    assert sample(after, "tuneserve_queue_depth", queue=settings.queue_name) == 2


def test_broker_down_is_reported_not_fatal(tmp_path: Path, model_dir: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, base_model=str(model_dir), reconcile_interval_seconds=0, broker_url="redis://127.0.0.1:1/0"
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as client:
        samples = scrape(client)
    assert sample(samples, "tuneserve_metrics_source_up", source="broker") == 0
    assert sample(samples, "tuneserve_metrics_source_up", source="database") == 1
    assert not any(name == "tuneserve_queue_depth" for name, _ in samples)


def test_labels_come_from_fixed_sets(api: tuple[TestClient, Settings]) -> None:
    """Odd methods and unknown paths cannot add series: they share one label each."""
    client, _ = api
    for method in ("FOO", "BREW", "X" * 50):
        assert client.request(method, "/jobs").status_code == 405
        assert client.request(method, f"/no/such/{method}").status_code == 404
    samples = scrape(client)
    methods = {dict(labels)["method"] for name, labels in samples if name == "tuneserve_http_requests_total"}
    routes = {dict(labels)["route"] for name, labels in samples if name == "tuneserve_http_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert sample(samples, "tuneserve_http_requests_total", method="other", route="/jobs", status="405") == 3
    assert sample(samples, "tuneserve_http_requests_total", method="other", route="<unmatched>", status="404") == 3
    assert not any("/no/such" in r for r in routes)


def test_scrapes_and_probes_share_one_reading_per_cache_window(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With metrics_cache_seconds, SQL and the broker are asked once however many scrapes and probes come
    (also when they come together: the others wait for the one reading)."""
    from concurrent.futures import ThreadPoolExecutor

    import api.services.health
    import core.repository.jobs as jobs_repo  # the module api.metrics calls

    settings = Settings(
        data_dir=tmp_path, base_model=str(model_dir), reconcile_interval_seconds=0, metrics_cache_seconds=60
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    calls = {"jobs": 0, "ready": 0}
    count_by_status, readiness_checks = jobs_repo.count_by_status, api.services.health.readiness_checks

    def counting_jobs(session):
        calls["jobs"] += 1
        return count_by_status(session)

    def counting_ready(s):
        calls["ready"] += 1
        return readiness_checks(s)

    monkeypatch.setattr(jobs_repo, "count_by_status", counting_jobs)
    monkeypatch.setattr(api.services.health, "readiness_checks", counting_ready)
    with TestClient(create_app(settings)) as client:
        with ThreadPoolExecutor(8) as pool:
            scrapes = list(pool.map(lambda _: client.get("/metrics").status_code, range(16)))
            probes = list(pool.map(lambda _: client.get("/readyz").status_code, range(16)))
    assert scrapes == [200] * 16 and probes == [200] * 16
    assert calls == {"jobs": 1, "ready": 1}


def test_metrics_token(tmp_path: Path, model_dir: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, base_model=str(model_dir), reconcile_interval_seconds=0, metrics_token="scrape-secret"
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as client:
        for headers, code in (
            ({}, "missing_metrics_token"),
            (bearer("wrong"), "invalid_metrics_token"),
            (bearer(mint_api_key(settings)), "invalid_metrics_token"),
        ):
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", refused.text
            error = refused.json()["error"]
            assert error["code"] == code and error["param"] == "Authorization", error
            assert "TUNESERVE_METRICS_TOKEN" in error["message"]
        assert client.get("/metrics", headers=bearer("scrape-secret")).status_code == 200
        assert client.get("/healthz").status_code == 200  # the probes stay open
