"""Property-based tests of the whole API from its own OpenAPI document (schemathesis, in-process ASGI).

Every operation gets generated inputs, valid and invalid. A response must match the documented status
codes, headers and schemas, and no 5xx may come back except 503 from the routes that need the serving
process (not started here: they must say so with a 503, not fail).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import negative_data_rejection, not_a_server_error, positive_data_acceptance
from schemathesis.core.parameters import ParameterLocation

from api.main import create_app
from core.migrate import upgrade
from core.settings import Settings
from tests.support.markers import requires
from tests.support.stack import bearer, mint_api_key

SERVING_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# schemathesis' lazy from_fixture loader does not run on pytest 9, so the app is built at import: the
# embedded (SQLite) deployment with no worker and no serving (nothing listens on its serving port).
# The fixture below points it at the test model and migrates its database before any request.
DATA_DIR = Path(tempfile.mkdtemp(prefix="tuneserve-schema-"))
APP_SETTINGS = Settings(
    data_dir=DATA_DIR, reconcile_interval_seconds=0, serving_port=_closed_port(), serving_timeout_seconds=5
)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(APP_SETTINGS))


@pytest.fixture(scope="module", autouse=True)
@requires("stack")
def deployment(model_dir: Path, demo_files: tuple[Path, Path]) -> Iterator[Settings]:
    APP_SETTINGS.base_model, APP_SETTINGS.served_model_name = str(model_dir), model_dir.name
    upgrade(APP_SETTINGS.database_url)
    API_KEY.append(mint_api_key(APP_SETTINGS))
    # A dataset and a queued job (no worker runs here), so listings and lookups answer with real rows too.
    client = TestClient(schema.app, headers=bearer(API_KEY[0]))
    train, test = demo_files
    uploaded = client.post("/datasets", files={"file": train.read_bytes(), "test_file": test.read_bytes()})
    assert uploaded.status_code == 201, uploaded.text
    job = client.post("/jobs", json={"dataset_id": uploaded.json()["id"], "evaluation": {"enabled": False}})
    assert job.status_code == 201, job.text
    yield APP_SETTINGS
    # What was tried, for the record (pytest -s or -rP shows it): requests per mode and status class.
    print("schemathesis requests:", dict(sorted(TALLY.items())))
    shutil.rmtree(DATA_DIR, ignore_errors=True)


TALLY: Counter[str] = Counter()
API_KEY: list[str] = []  # the deployment's key, minted once the database exists
# Schema-valid requests this API refuses on purpose, with a 422 naming the field (docs/architecture.md, invariant 10),
# for rules a JSON schema cannot state: the one served base model, LoRA ranks vLLM can serve, a JSONL
# file's lines, a dataset's size against test_fraction, a multipart text part sent where a file goes.
EXCLUDED_CHECKS = [positive_data_acceptance]


# Extra strategies (issue 12): besides what the schema allows, half the generated bodies and queries get one value
# swapped for a hostile one of its type: an integer past 32 or 64 bits, or a string of up to a million characters
# (or of NULs, or astral characters). Each must be refused with a 4xx naming the field, never a 5xx.
BIG_INTEGERS = st.sampled_from([2**31, 2**31 - 1, 2**32, 2**63, 2**63 - 1, 2**64, -(2**63) - 1, 10**30])
LONG_STRINGS = st.one_of(
    st.integers(min_value=1_000, max_value=1_100_000).map(lambda n: "x" * n),
    st.sampled_from(["\x00" * 1000, "é𝄞" * 50_000, " " * 100_000]),
)


def _leaves(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where the integers (not booleans) and strings of a generated value are."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, (*at, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, (*at, i))]
    if (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str):
        return [at]
    return []


def _get(value: Any, at: tuple[Any, ...]) -> Any:
    for part in at:
        value = value[part]
    return value


def _replaced(value: Any, at: tuple[Any, ...], new: Any) -> Any:
    if not at:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[at[0]] = _replaced(value[at[0]], at[1:], new)
    return copy


def _with_one_hostile_value(value: Any) -> st.SearchStrategy[Any]:
    leaves = _leaves(value)
    if not leaves:
        return st.just(value)

    def swap(at: tuple[Any, ...]) -> st.SearchStrategy[Any]:
        kind = BIG_INTEGERS if isinstance(_get(value, at), int) else LONG_STRINGS
        return kind.map(lambda new: _replaced(value, at, new))

    return st.one_of(st.just(value), st.sampled_from(leaves).flatmap(swap))


@schema.hook
def flatmap_body(ctx: Any, body: Any) -> st.SearchStrategy[Any]:
    return _with_one_hostile_value(body)


@schema.hook
def flatmap_query(ctx: Any, query: Any) -> st.SearchStrategy[Any]:
    return _with_one_hostile_value(query)


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    # The deployment's key, unless this case's headers are the invalid part (then it keeps schemathesis'
    # own Authorization, or none, and must get a 401).
    if case.meta is None or not case.meta.is_negative_at(ParameterLocation.HEADER):
        case.headers = {**(case.headers or {}), **bearer(API_KEY[0])}  # type: ignore[assignment, dict-item]  # a dict will do
    response = case.call()
    mode = case.meta.generation.mode.value if case.meta else "explicit"
    TALLY[f"{mode} {response.status_code // 100}xx"] += 1
    if response.status_code >= 500:
        TALLY[f"{mode} {response.status_code} {case.method} {case.path}"] += 1
    if response.status_code == 503 and case.path in SERVING_ROUTES:
        # Serving is not running: these routes must say so (503 + Retry-After), and nothing else may 5xx.
        assert response.json()["error"]["type"] == "service_unavailable_error"
        assert "retry-after" in {name.lower() for name in response.headers}
        case.validate_response(response, excluded_checks=[*EXCLUDED_CHECKS, not_a_server_error])
        return
    if response.status_code == 413:
        # A body past max_json_body_bytes (a generated array past its maxItems can be megabytes) is refused before
        # routing with a 413 naming the setting: a rejection, though not one of schemathesis' expected codes.
        assert response.json()["error"]["code"] == "payload_too_large", response.text[:500]
        case.validate_response(response, excluded_checks=[*EXCLUDED_CHECKS, negative_data_rejection])
        return
    case.validate_response(response, excluded_checks=EXCLUDED_CHECKS)
