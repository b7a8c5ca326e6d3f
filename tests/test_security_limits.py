"""Issue 25's boundaries and limits on an app over SQLite (no worker, no serving): auth off serves only a loopback
Host and same-origin pages, every answer carries the security headers, /metrics beyond loopback needs its token,
the adapter-unpacking child inherits no secret; max_examples is capped, uploads in progress are capped per tenant,
reservations grow with what work writes and evaluation samples count against the storage quota."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core import reservations
from core.adapter_import import CHILD_ENV_KEYS, unpack_adapter, unpack_child_env
from core.migrate import upgrade
from core.model_info import weight_shapes
from core.models import Dataset
from core.settings import Settings
from tests.support.adapters import tar_gz
from tests.support.aio import run_async
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


def test_concurrent_uploads_past_the_cap_are_429_before_the_body_is_read(app_settings: Settings) -> None:
    """Issue 25, item 9: one tenant's uploads in progress at once are capped (here 1); the next is refused at once,
    the slot is given back when the upload ends, and another tenant is not held up."""
    settings = app_settings.model_copy(update={"max_concurrent_uploads_per_tenant": 1})
    app = create_app(settings)
    mine, theirs = bearer(mint_api_key(settings)), bearer(mint_api_key(settings, "other-uploader", new_tenant=True))
    rows = b'{"prompt": "p", "completion": "c"}\n' * 4
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    async def scenario() -> tuple[int, int, int, int, str]:
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield head
            await release.wait()  # the upload is in progress, its body still arriving
            yield rows + tail

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL, timeout=30) as http:
            first = asyncio.ensure_future(http.post("/datasets", content=slow_body(), headers={**headers, **mine}))
            await asyncio.sleep(0.2)
            second = await http.post("/datasets", content=head + rows + tail, headers={**headers, **mine})
            other = await http.post("/datasets", content=head + rows + tail, headers={**headers, **theirs})
            release.set()
            done = await first
            again = await http.post("/datasets", content=head + rows + tail, headers={**headers, **mine})
            return second.status_code, other.status_code, done.status_code, again.status_code, second.text

    second, other, first, again, text = run_async(scenario())
    assert second == 429 and "TUNESERVE_MAX_CONCURRENT_UPLOADS_PER_TENANT" in text, text
    assert (other, first, again) == (201, 201, 201)


def test_reservations_grow_with_what_the_work_writes(model_dir: Path) -> None:
    """Issue 25, item 8: a full fine-tune reserves more than a low-rank LoRA; a LoRA's reservation grows with its rank, its
    targets and its checkpoints; a merge reserves the base model's files."""
    base = str(model_dir)
    lora = reservations.job_bytes(base, "lora", {"lora_r": 8})
    assert reservations.job_bytes(base, "lora", {"lora_r": 16}) == 2 * lora or lora == reservations.MIN_RESERVATION
    attention = reservations.job_bytes(base, "lora", {"lora_r": 64, "target_modules": "attention"})
    assert attention < reservations.job_bytes(base, "lora", {"lora_r": 64})
    more = reservations.job_bytes(base, "lora", {"lora_r": 64, "keep_checkpoints": 5})
    assert more > reservations.job_bytes(base, "lora", {"lora_r": 64})
    full = reservations.job_bytes(base, "full", {})
    assert full > lora
    params = sum(math.prod(shape) for _, shape in weight_shapes(base))
    assert full == params * 4 * (1 + 3 * 2)  # fp32 model + 2 checkpoints of parameters and AdamW's moments
    assert reservations.merge_bytes(base) >= sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def test_an_evaluation_reserves_its_samples_against_the_storage_quota(app_settings: Settings) -> None:
    """Issue 25, item 10: samples count against the storage quota; an evaluation whose samples would pass it is a
    413 at admission, and one that fits reserves them while it is queued."""
    from api.services.usage import tenant_usage
    from core.db import session_scope

    settings = app_settings.model_copy(update={"max_evaluation_examples": 2})
    key = mint_api_key(settings, "evaluator", new_tenant=True)
    with TestClient(create_app(settings), headers=bearer(key)) as client:
        rows = b"".join(b'{"prompt": "p%d", "completion": "c"}\n' % i for i in range(3))
        dataset_id = client.post("/datasets", files={"file": rows, "test_file": rows}).json()["id"]
        with session_scope(settings.database_url) as s:
            tenant_id = s.get(Dataset, dataset_id).tenant_id  # type: ignore[union-attr]
            before = tenant_usage(s, settings, tenant_id)
        assert before.sample_bytes == 0 and before.reserved_bytes == 0
        tight = settings.model_copy(update={"max_storage_bytes_per_tenant": before.committed_bytes + 1})
        with TestClient(create_app(tight), headers=bearer(key)) as limited:
            refused = limited.post("/evaluations", json={"dataset_id": dataset_id})
        assert refused.status_code == 413 and refused.json()["error"]["param"] == "max_storage_bytes_per_tenant"
        queued = client.post("/evaluations", json={"dataset_id": dataset_id})
        assert queued.status_code == 201, queued.text
        with session_scope(settings.database_url) as s:
            reserved = tenant_usage(s, settings, tenant_id).reserved_bytes
        assert reserved > 0  # 2 examples (the cap) x 1 scale, each estimated from the dataset's rows
        assert client.get("/usage").json()["storage_bytes"]["reserved"] == reserved
        client.post(f"/evaluations/{queued.json()['id']}/cancel")
