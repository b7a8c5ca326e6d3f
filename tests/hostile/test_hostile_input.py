"""A hostile-input corpus against every route of the API, on the embedded (SQLite) stack: huge integers, NaN and
Infinity, wrong JSON types at every depth of every body, deep nesting, huge strings, odd methods, headers and
content types, odd multipart uploads and every kind of archive bomb. Nothing may answer 5xx (except 503 from the
routes that need the serving process, which is not running here), and every refusal is in the one error shape.

Each test collects every offending request and reports them together, so one run shows the whole class.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.main import create_app
from core.migrate import upgrade
from core.settings import Settings
from tests.hostile import archives
from tests.support.http import Response
from tests.support.markers import requires
from tests.support.stack import bearer, mint_api_key

SERVING_ROUTES = {"/generate", "/v1/completions", "/v1/chat/completions"}
PLACEHOLDER = "__hostile__"

# Raw JSON text put in place of one value of a valid body.
HOSTILE_JSON = {
    "2^31": "2147483648",
    "2^63": "9223372036854775808",
    "2^64": "18446744073709551616",
    "10^400": "1" + "0" * 400,
    "-2^63-1": "-9223372036854775809",
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e999": "1e999",
    "-0.0": "-0.0",
    "float": "0.5",
    "null": "null",
    "true": "true",
    "empty list": "[]",
    "empty object": "{}",
    "list of 10k": "[" + ",".join(["1"] * 10_000) + "]",
    "100k chars": json.dumps("x" * 100_000),
    "NUL": json.dumps("\x00"),
    "lone surrogate": '"\\ud800"',
    "unicode": json.dumps("é𝄞" * 1000),
    "string number": '"9223372036854775808"',
    "string inf": '"inf"',
    "string nan": '"NaN"',
    "100k deep": "[" * 100_000 + "]" * 100_000,
    # issue 25: what would make a worker or serving reach out or backtrack (a grader schema, a content part, a regex)
    "remote $ref": json.dumps({"$ref": "http://127.0.0.1:9/x", "type": "object"}),
    "media part": json.dumps([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]),
    "ReDoS regex": json.dumps("^(a+)+$"),
}
HOSTILE_QUERY = [
    "2147483648",
    "9223372036854775808",
    "1" + "0" * 400,
    "-1",
    "-9223372036854775809",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "",
    " ",
    "x" * 10_000,
    "\x00",
    "%00",
    "[]",
    "{}",
    "true",
    "null",
    "0x10",
    "é𝄞",
]
HOSTILE_PATH = ["x" * 4000, "%00", "..", "%2e%2e%2f%2e%2e", "é𝄞", "null", "-1", "9223372036854775808", "a b", "ftjob-"]
ODD_METHODS = ["FOO", "PROPFIND", "TRACE", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS", "X" * 64]
ODD_BODIES = {
    "not JSON": b"{oops",
    "empty": b"",
    "null": b"null",
    "list": b"[]",
    "string": b'"x"',
    "number": b"1e999",
    "NaN": b"NaN",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "not UTF-8": b'{"x": "\xff\xfe"}',
    "UTF-16": '{"x": 1}'.encode("utf-16"),
    "BOM": b'\xef\xbb\xbf{"x": 1}',
    "NUL bytes": b"\x00" * 1000,
    "duplicate keys": b'{"a": 1, "a": 2}',
}
ODD_CONTENT_TYPES = [
    "text/plain",
    "application/json; charset=utf-16",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "application/x-www-form-urlencoded",
    "application/xml",
    "application/json" + "; x=y" * 1000,
    "",
]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The embedded stack always; TUNESERVE_HOSTILE_DB=postgres runs the corpus on Postgres + Redis too (it found the NUL
# class: Postgres text cannot hold one, SQLite's can).
BACKENDS = ["sqlite", *(["postgres"] if os.environ.get("TUNESERVE_HOSTILE_DB") == "postgres" else [])]


@pytest.fixture(scope="module", params=BACKENDS)
@requires("stack")
def hostile(request: pytest.FixtureRequest, model_dir: Path, demo_files: tuple[Path, Path]) -> Iterator[dict[str, Any]]:
    """The embedded deployment (auth on, no worker, serving down) with one of each resource to aim at."""
    data_dir = Path(tempfile.mkdtemp(prefix="tuneserve-hostile-"))
    databases: dict[str, Any] = {}
    if request.param == "postgres":
        from tests.support.databases import create_pg_database, pg_url
        from tests.support.paths import REDIS_URL

        databases = {"name": create_pg_database()}
        databases.update(database_url=pg_url(databases["name"]), broker_url=REDIS_URL)
    # Quotas out of the way: a hostile value that is accepted must not turn later ones into a 429 that hides them.
    settings = Settings(
        data_dir=data_dir,
        base_model=str(model_dir),
        reconcile_interval_seconds=0,
        serving_port=_closed_port(),
        serving_timeout_seconds=5,
        queue_name=f"tuneserve-hostile-{secrets.token_hex(4)}",
        max_active_jobs=100_000,
        max_active_evaluations=100_000,
        max_active_adapter_operations=100_000,
        **{k: v for k, v in databases.items() if k != "name"},
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    key = mint_api_key(settings)
    with TestClient(create_app(settings), headers=bearer(key), raise_server_exceptions=False) as client:
        train, test = demo_files
        dataset = client.post("/datasets", files={"file": train.read_bytes(), "test_file": test.read_bytes()}).json()
        job = client.post("/jobs", json={"dataset_id": dataset["id"], "evaluation": {"enabled": False}}).json()
        evaluation = client.post("/evaluations", json={"dataset_id": dataset["id"], "max_examples": 2}).json()
        ids = {
            "dataset_id": dataset["id"],
            "job_id": job["id"],
            "evaluation_id": evaluation["id"],
            "name": "ft-no-such-adapter",
            "operation_id": "adop-no-such-operation",
        }
        yield {"client": client, "settings": settings, "ids": ids, "model": settings.served_model_name}
    shutil.rmtree(data_dir, ignore_errors=True)
    if databases:
        import redis

        from tests.support.databases import drop_pg_database

        redis.Redis.from_url(databases["broker_url"]).delete(settings.queue_name)
        drop_pg_database(databases["name"])


class Verdicts:
    """Every response checked: no 5xx (but serving's 503), and a 4xx in the one error shape."""

    def __init__(self) -> None:
        self.bad: list[str] = []
        self.count = 0

    def check(self, label: str, response: Response, path: str) -> None:
        self.count += 1
        status = response.status_code
        if status >= 500:
            serving_down = (
                status == 503
                and path in SERVING_ROUTES
                and response.json().get("error", {}).get("type") == "service_unavailable_error"
            )
            if not serving_down:
                self.bad.append(f"{label}: {status} {response.text[:200]}")
            return
        if status >= 400 and response.request.method != "HEAD":
            try:
                error = response.json()["error"]
                assert set(error) == {"type", "code", "message", "param"} and error["message"]
            except Exception:  # noqa: BLE001 - report every kind of malformed refusal the same way
                self.bad.append(f"{label}: {status} not in the error shape: {response.text[:200]}")

    def send(self, client: TestClient, label: str, method: str, path: str, **kwargs: Any) -> None:
        url = kwargs.pop("url", path)
        try:
            response = client.request(method, url, **kwargs)
        except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
            return  # the client library refuses to send it: nothing reached the server
        self.check(label, response, path)

    def assert_clean(self) -> None:
        assert not self.bad, f"{len(self.bad)} of {self.count} hostile requests failed:\n" + "\n".join(self.bad[:50])


def _routes(client: TestClient) -> list[tuple[str, str, APIRoute]]:
    return [
        (method, route.path, route)
        for route in client.app.routes  # type: ignore[attr-defined]  # a FastAPI app
        if isinstance(route, APIRoute)
        for method in sorted(route.methods or ())
    ]


def _fill(path: str, ids: dict[str, str], override: dict[str, str] | None = None) -> str:
    values = {**ids, **(override or {})}
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return path


# validate parses the same grader as run: run's body alone carries it (a multi, a template of each namespace).
_OPENAI_GRADER = {
    "type": "multi",
    "name": "m",
    "graders": {
        "a": {
            "type": "string_check",
            "name": "a",
            "input": "{{sample.output_json.a}}",
            "reference": "{{item.x}}",
            "operation": "eq",
        }
    },
    "calculate_output": "2 ^ a / (a + 1)",
}


def _base_bodies(ids: dict[str, str], model: str) -> dict[tuple[str, str], list[Any]]:
    """A valid (or nearly valid) body per JSON route, whose every value is then replaced by each hostile one."""
    return {
        ("POST", "/jobs"): [
            {
                "dataset_id": ids["dataset_id"],
                "method": "lora",
                "suffix": "s",
                "hyperparameters": {
                    "max_steps": 2,
                    "learning_rate": 0.001,
                    "lora_r": 8,
                    "lora_alpha": 16,
                    "lora_dropout": 0.05,
                    "warmup_ratio": 0.0,
                    "batch_size": 2,
                    "target_modules": ["q_proj"],
                    "seed": 1,
                    "distributed": {"num_processes": 1},
                },
                "evaluation": {"enabled": False, "scales": [1.0], "max_examples": 2, "metrics": ["exact_match"]},
            }
        ],
        ("POST", "/evaluations"): [
            {
                "dataset_id": ids["dataset_id"],
                "split": "test",
                "adapter": None,
                "metrics": ["exact_match"],
                "batch_size": 2,
                "max_new_tokens": 4,
                "max_examples": 2,
            }
        ],
        ("POST", "/generate"): [
            {"prompt": "hi", "max_tokens": 4, "temperature": 0, "top_k": 2, "seed": 1, "stop": ["x"], "stream": False},
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        ],
        ("POST", "/v1/completions"): [
            {
                "model": model,
                "prompt": ["hi", "there"],
                "max_tokens": 4,
                "n": 1,
                "stream": False,
                "stream_options": {"include_usage": True},
                "user": "u",
                "echo": False,  # lm-eval's fields, on the /v1 allowlist: hostile values reach them too
                "logprobs": 1,
            }
        ],
        ("POST", "/v1/chat/completions"): [
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "n"},
                ],
                "max_completion_tokens": 4,
                "seed": 3,
                "top_logprobs": 1,
                "response_format": {"type": "text"},
            }
        ],
        ("POST", "/v1/fine_tuning/alpha/graders/run"): [
            {"grader": _OPENAI_GRADER, "model_sample": '{"a": "P"}', "item": {"x": "P"}}
        ],
        ("POST", "/adapters/{name}/derive"): [{"scale": 0.5}],
        ("POST", "/adapters/{name}/merge"): [{"scale": 0.5}],
    }


def _paths_of(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value (the value itself, each key, each item), plus an unknown key in each object."""
    yield at
    if isinstance(value, dict):
        yield (*at, "__unknown_key__")
        for key, item in value.items():
            yield from _paths_of(item, (*at, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths_of(item, (*at, i))


def _with_placeholder(body: Any, at: tuple[Any, ...]) -> Any:
    if not at:
        return PLACEHOLDER
    body = json.loads(json.dumps(body))
    target = body
    for part in at[:-1]:
        target = target[part]
    target[at[-1]] = PLACEHOLDER
    return body


def test_every_json_value_of_every_body_replaced_by_hostile_ones(hostile: dict[str, Any]) -> None:
    client, ids = hostile["client"], hostile["ids"]
    verdicts = Verdicts()
    bodies = _base_bodies(ids, hostile["model"])
    routes = {(m, p) for m, p, route in _routes(client) if route.body_field is not None}
    missing = routes - set(bodies) - {("POST", "/datasets"), ("POST", "/adapters")}  # the uploads: below
    for key in missing:  # a JSON route this corpus has no valid body for: hostile values at its top level at least
        bodies[key] = [{}]
    for (method, path), variants in bodies.items():
        url = _fill(path, ids)
        for base in variants:
            # The unchanged body must get past validation, or the hostile values below would never reach deeper.
            control = client.request(method, url, json=base)
            if (method, path) not in missing:
                assert control.status_code in (200, 201, 202, 404, 503), (path, control.text)
                assert control.status_code != 404 or path.startswith("/adapters/"), (path, control.text)
            for at in _paths_of(base):
                text = json.dumps(_with_placeholder(base, at))
                for label, raw in HOSTILE_JSON.items():
                    content = text.replace(json.dumps(PLACEHOLDER), raw)
                    verdicts.send(
                        client,
                        f"{method} {path} {list(at)}={label}",
                        method,
                        path,
                        url=url,
                        content=content.encode("utf-8", "surrogatepass"),
                        headers={"content-type": "application/json"},
                    )
    verdicts.assert_clean()
    assert verdicts.count > 2000


def test_odd_bodies_and_content_types_on_every_route(hostile: dict[str, Any]) -> None:
    client, ids = hostile["client"], hostile["ids"]
    verdicts = Verdicts()
    for method, path, _ in _routes(client):
        url = _fill(path, ids)
        for label, body in ODD_BODIES.items():
            verdicts.send(
                client,
                f"{method} {path} body={label}",
                method,
                path,
                url=url,
                content=body,
                headers={"content-type": "application/json"},
            )
        for content_type in ODD_CONTENT_TYPES:
            verdicts.send(
                client,
                f"{method} {path} content-type={content_type[:40]}",
                method,
                path,
                url=url,
                content=b'{"x": 1}',
                headers={"content-type": content_type},
            )
    verdicts.assert_clean()


def test_hostile_query_and_path_parameters_on_every_route(hostile: dict[str, Any]) -> None:
    client, ids = hostile["client"], hostile["ids"]
    verdicts = Verdicts()
    for method, path, route in _routes(client):
        for param in route.dependant.query_params:
            for value in HOSTILE_QUERY:
                verdicts.send(
                    client,
                    f"{method} {path} ?{param.alias}={value[:20]!r}",
                    method,
                    path,
                    url=_fill(path, ids),
                    params={param.alias: value},
                )
        for param in route.dependant.path_params:
            for value in HOSTILE_PATH:
                url = _fill(path, ids, {param.name: value})
                verdicts.send(client, f"{method} {path} {param.name}={value[:20]!r}", method, path, url=url)
    verdicts.assert_clean()


def test_odd_methods_and_headers_on_every_route(hostile: dict[str, Any]) -> None:
    client, ids, settings = hostile["client"], hostile["ids"], hostile["settings"]
    verdicts = Verdicts()
    paths = {p for _, p, _ in _routes(client)} | {"/metrics", "/docs", "/openapi.json", "/no/such/path", "/"}
    odd_headers = [
        {"Authorization": "Bearer " + "x" * 10_000},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer  "},
        {"Authorization": "bearer tsk_\x7f"},
        {"Authorization": "Basic " + "=" * 100},
        {"Authorization": "é"},
        {"Idempotency-Key": "x" * 10_000},
        {"Idempotency-Key": ""},
        {"Idempotency-Key": " "},
        {"Content-Length": "18446744073709551616"},
        {"Content-Length": "-1"},
        {"Transfer-Encoding": "gzip"},
        {"Accept": "x/y" * 1000},
        {"X-Forwarded-For": "1" * 5000},
        {"Host": "x" * 1000},
    ]
    for path in sorted(paths):
        url = _fill(path, ids)
        for method in ODD_METHODS:
            verdicts.send(client, f"{method[:10]} {path}", method, path, url=url)
        for headers in odd_headers:
            for method in ("GET", "POST"):
                verdicts.send(
                    client, f"{method} {path} {list(headers)[0]}", method, path, url=url, headers=headers, content=b"{}"
                )
    # Without a key, on every route: a 401 in the one shape (or the open routes' answers), never a 5xx.
    anonymous = TestClient(client.app, raise_server_exceptions=False)
    for method, path, _ in _routes(client):
        verdicts.send(anonymous, f"anonymous {method} {path}", method, path, url=_fill(path, ids), content=b"{}")
    assert settings.auth_enabled
    verdicts.assert_clean()


def test_hostile_dataset_uploads(hostile: dict[str, Any]) -> None:
    client = hostile["client"]
    verdicts = Verdicts()
    good = b'{"prompt": "a", "completion": "b"}\n' * 4
    files_cases = {
        "not UTF-8": b"\xff\xfe\x00",
        "deep line": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        "NaN": b'{"prompt": NaN, "completion": "b"}\n',
        "huge int": b'{"prompt": 1' + b"0" * 5000 + b', "completion": "b"}\n',
        "blank lines": b"\n" * 10_000,
        "NULs": b"\x00" * 10_000,
        "one long line": b"x" * (2 * 1024 * 1024),
        "messages of numbers": b'{"messages": [1, 2, 3]}\n',
        "messages object": b'{"messages": {"role": "user"}}\n',
        "10k messages": json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 5000}
        ).encode()
        + b"\n",
        "lone surrogate": b'{"prompt": "\\ud800", "completion": "b"}\n',
        "empty": b"",
    }
    for label, data in files_cases.items():
        verdicts.send(client, f"datasets file={label}", "POST", "/datasets", files={"file": ("f.jsonl", data)})
    form_cases = {
        "test_fraction": ["nan", "inf", "-inf", "1e-400", "1e999", "-1", "1", "x", "", "0x1"],
        "seed": ["9223372036854775808", "1" + "0" * 400, "-1", "1.5", "nan", "x", ""],
    }
    for field, values in form_cases.items():
        for value in values:
            form = {field: value, **({"test_fraction": "0.5"} if field == "seed" else {})}
            verdicts.send(
                client,
                f"datasets {field}={value[:20]}",
                "POST",
                "/datasets",
                files={"file": ("f.jsonl", good)},
                data=form,
            )
    for filename in ("x" * 10_000, "../../etc/passwd", "a\x00b", "é𝄞.jsonl", ""):
        verdicts.send(
            client, f"datasets filename={filename[:20]!r}", "POST", "/datasets", files={"file": (filename, good)}
        )
    verdicts.send(client, "datasets file as a text field", "POST", "/datasets", data={"file": "not a file"})
    verdicts.send(client, "datasets test_file alone", "POST", "/datasets", files={"test_file": ("t.jsonl", good)})
    verdicts.send(
        client,
        "datasets both splits",
        "POST",
        "/datasets",
        files={"file": ("a.jsonl", good), "test_file": ("b.jsonl", good)},
        data={"test_fraction": "0.5"},
    )
    verdicts.send(
        client,
        "datasets Idempotency-Key odd",
        "POST",
        "/datasets",
        files={"file": ("a.jsonl", good)},
        headers={"Idempotency-Key": "\t"},
    )
    verdicts.assert_clean()


def test_archive_bombs_and_odd_archives(hostile: dict[str, Any]) -> None:
    client = hostile["client"]
    verdicts = Verdicts()
    config = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}).encode()
    weights = archives.safetensors({"x.lora_A.weight": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 0]}})
    good = {"adapter_config.json": config, "adapter_model.safetensors": weights}
    cases = {
        "100k empty members (gzip)": archives.many_empty_members(100_000),
        "100k empty members (bz2)": archives.many_empty_members(100_000, compress="bz2"),
        "zip of 5000 members": archives.zip_of_many_members(5000),
        "declares 100 GiB over zeros": archives.declared_huge_over_zeros(),
        "64 MiB long name": archives.long_name_bomb(64),
        "64 MiB of zeros to skip": archives.slow_to_skip(64, good),
        "config NaN": archives.tar_gz({**good, "adapter_config.json": b'{"peft_type": "LORA", "r": NaN}'}),
        "config deep": archives.tar_gz({**good, "adapter_config.json": b"[" * 100_000}),
        "config a list": archives.tar_gz({**good, "adapter_config.json": b"[]"}),
        "config r 2^63": archives.tar_gz(
            {**good, "adapter_config.json": b'{"peft_type": "LORA", "r": 9223372036854775808}'}
        ),
        "weights header []": archives.tar_gz({**good, "adapter_model.safetensors": archives.safetensors([])}),
        "weights header 2^64": archives.tar_gz(
            {**good, "adapter_model.safetensors": archives.safetensors({}, declared_len=2**64 - 1)}
        ),
        "weights empty": archives.tar_gz({**good, "adapter_model.safetensors": b""}),
        "not an archive": b"\x1f\x8b" + b"\x00" * 100,
        "empty": b"",
        "truncated gzip": archives.tar_gz(good)[:-20],
    }
    for label, data in cases.items():
        verdicts.send(client, f"adapters {label}", "POST", "/adapters", files={"file": ("a.tar.gz", data)})
    for suffix in ("x" * 1000, "../..", "A", "", "\x00"):
        verdicts.send(
            client,
            f"adapters suffix={suffix[:10]!r}",
            "POST",
            "/adapters",
            files={"file": ("a.tar.gz", archives.tar_gz(good))},
            data={"suffix": suffix},
        )
    verdicts.assert_clean()


# Was a 500: "inf" strings passed pydantic's lax float parsing and Postgres' JSON column refused the Infinity.
@pytest.mark.stack  # its own Postgres database and Redis
def test_job_floats_sent_as_inf_strings_on_postgres(model_dir: Path, demo_files: tuple[Path, Path]) -> None:
    import redis

    from tests.support.databases import create_pg_database, drop_pg_database, pg_url
    from tests.support.paths import REDIS_URL

    name = create_pg_database()
    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="tuneserve-hostile-pg-")),
        base_model=str(model_dir),
        reconcile_interval_seconds=0,
        database_url=pg_url(name),
        broker_url=REDIS_URL,
        queue_name=f"tuneserve-hostile-{secrets.token_hex(4)}",
    )
    try:
        settings.ensure_dirs()
        upgrade(settings.database_url)
        with TestClient(
            create_app(settings), headers=bearer(mint_api_key(settings)), raise_server_exceptions=False
        ) as client:
            dataset = client.post("/datasets", files={"file": demo_files[0].read_bytes()}).json()["id"]
            statuses = [
                client.post(
                    "/jobs",
                    json={"dataset_id": dataset, "evaluation": {"enabled": False}, "hyperparameters": {field: "inf"}},
                ).status_code
                for field in ("lora_alpha", "weight_decay")
            ]
        assert all(status < 500 for status in statuses), statuses
    finally:
        redis.Redis.from_url(REDIS_URL).delete(settings.queue_name)
        drop_pg_database(name)
        shutil.rmtree(settings.data_dir, ignore_errors=True)
