"""Issue 25's boundaries at the browser, the scrape and the API host, on an app over SQLite (no worker, no
serving): auth off serves only a loopback Host and same-origin pages, every answer carries the security headers,
/metrics beyond loopback needs its token, and the adapter-unpacking child inherits no secret."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.adapter_import import CHILD_ENV_KEYS, unpack_adapter, unpack_child_env
from core.migrate import upgrade
from core.settings import Settings
from tests.support.adapters import tar_gz
from tests.support.stack import bearer, mint_api_key

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One migrated SQLite database for the module; each test builds the app it needs over it."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("security"), reconcile_interval_seconds=0, metrics_cache_seconds=60
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    return settings


@pytest.fixture(scope="module")
def keyless(app_settings: Settings) -> Iterator[TestClient]:
    """The app with auth off (the embedded demo), reached as a browser on this host reaches it."""
    settings = app_settings.model_copy(update={"auth_enabled": False})
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        yield client


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "10.0.0.5:8000", "127.0.0.1.nip.io"])
def test_auth_off_refuses_a_host_that_is_not_loopback(keyless: TestClient, host: str) -> None:
    """DNS rebinding: a name the attacker points at 127.0.0.1 still says its own name in Host."""
    refused = keyless.get("/datasets", headers={"Host": host})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["param"] == "Host" and refused.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "localhost", "[::1]:8000"])
def test_auth_off_serves_loopback_hosts_and_same_origin_pages(keyless: TestClient, host: str) -> None:
    assert keyless.get("/datasets", headers={"Host": host}).status_code == 200
    same = keyless.post("/jobs", json={}, headers={"Host": host, "Origin": f"http://{host}"})
    assert same.status_code == 422, same.text  # routed (the body is the route's to refuse), not the guard's 403


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:9999", "http://localhost:8000"])
def test_auth_off_refuses_a_cross_site_origin(keyless: TestClient, origin: str) -> None:
    """CSRF: another page (another port is another origin) posting to the keyless API."""
    refused = keyless.post("/jobs", json={}, headers={"Origin": origin})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["param"] == "Origin" and refused.json()["error"]["code"] == "cross_site_request"


def test_auth_on_needs_no_host_check(app_settings: Settings) -> None:
    """With keys a cross-site page has nothing to ride on (no cookie): Host and Origin are not the guard's."""
    with TestClient(create_app(app_settings)) as client:
        assert client.get("/healthz", headers={"Origin": "https://elsewhere.example"}).status_code == 200


def test_every_answer_carries_the_security_headers(app_settings: Settings) -> None:
    with TestClient(create_app(app_settings)) as client:
        answers = {
            "api": client.get("/healthz"),
            "refusal": client.get("/datasets"),  # the guard's 401
            "missing": client.get("/no-such-route"),
            "console": client.get("/ui/jobs"),
            "static": client.get("/ui/static/js/console.js"),
            "docs": client.get("/docs"),
        }
    for name, answer in answers.items():
        assert answer.headers["x-content-type-options"] == "nosniff", name
        assert answer.headers["referrer-policy"] == "no-referrer", name
        assert answer.headers["x-frame-options"] == "DENY", name
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], name
    assert answers["api"].headers["content-security-policy"].startswith("default-src 'none'")
    console = answers["console"].headers["content-security-policy"]
    assert "script-src 'self' 'unsafe-eval';" in console and "'unsafe-inline'" not in console
    assert "<script>" not in answers["console"].text  # every script is a file, so the policy needs no inline
    docs = answers["docs"].headers["content-security-policy"]
    assert "'sha256-" in docs and "'unsafe-inline'" not in docs.split("style-src")[0]


def test_metrics_beyond_loopback_need_a_token(app_settings: Settings) -> None:
    public = app_settings.model_copy(update={"api_host": "0.0.0.0"})
    with TestClient(create_app(public)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "metrics_token_required"
        assert "TUNESERVE_METRICS_TOKEN" in refused.json()["error"]["message"]
    with TestClient(create_app(public.model_copy(update={"metrics_token": "scrape"}))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape"}).status_code == 200
    with TestClient(create_app(app_settings)) as client:  # loopback: the local scraper needs nothing
        assert client.get("/metrics").status_code == 200


def test_the_unpack_child_gets_a_minimal_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No TUNESERVE_ setting (the database password), no credentials: only what starting Python needs; and the
    child still unpacks with it."""
    monkeypatch.setenv("TUNESERVE_DATABASE_URL", "postgresql+psycopg://tuneserve:secret@db/tuneserve")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    env = unpack_child_env()
    assert "secret" not in json.dumps(env)
    assert set(env) <= {*CHILD_ENV_KEYS, "PYTHONPATH", "PYTHONNOUSERSITE"}
    archive, target = tmp_path / "a.tar.gz", tmp_path / "out"
    archive.write_bytes(tar_gz({"a/adapter_config.json": b"{}", "a/adapter_model.safetensors": b"weights"}))
    target.mkdir()
    unpack_adapter(archive, target, Settings(data_dir=tmp_path))
    assert (target / "adapter_model.safetensors").read_bytes() == b"weights"


@pytest.fixture(scope="module")
def tenant(app_settings: Settings) -> Iterator[TestClient]:
    """A tenant of the app (auth on) with a dataset whose test split has 3 rows, no worker: work stays queued."""
    settings = app_settings.model_copy(update={"max_evaluation_examples": 2})
    with TestClient(create_app(settings), headers=bearer(mint_api_key(settings))) as client:
        rows = b"".join(b'{"prompt": "p%d", "completion": "c"}\n' % i for i in range(3))
        dataset = client.post("/datasets", files={"file": rows, "test_file": rows})
        assert dataset.status_code == 201, dataset.text
        client.headers["X-Dataset"] = dataset.json()["id"]
        yield client


def test_max_examples_is_capped_by_the_deployment(tenant: TestClient) -> None:
    dataset_id = tenant.headers["X-Dataset"]
    over = tenant.post("/evaluations", json={"dataset_id": dataset_id, "max_examples": 3})
    assert over.status_code == 422 and over.json()["error"]["param"] == "max_examples", over.text
    assert "TUNESERVE_MAX_EVALUATION_EXAMPLES" in over.json()["error"]["message"]
    job = {"dataset_id": dataset_id, "evaluation": {"max_examples": 3}}
    refused = tenant.post("/jobs", json=job)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "evaluation.max_examples", refused.text
    unbounded = tenant.post("/evaluations", json={"dataset_id": dataset_id})
    assert unbounded.status_code == 201, unbounded.text
    assert unbounded.json()["max_examples"] == 2  # the split's 3 rows, scored up to the cap
    tenant.post(f"/evaluations/{unbounded.json()['id']}/cancel")
