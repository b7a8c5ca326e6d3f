"""Graders are tenant input run on workers: they open no URL or file and match regexes in linear time (issue 25).

A local HTTP listener stands for an internal address: it must see no request, neither when a job naming a remote
`$ref` is created (a 422 naming the field) nor when a grader that somehow holds one scores (empty registry).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from core.errors import InvalidInput
from core.graders import JsonSchema, parse_grader
from tests.support.stack import Stack


class _Listener:
    def __init__(self) -> None:
        self.requests: list[str] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                listener.requests.append(self.path)
                body = b'{"type": "string"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/x"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    it = _Listener()
    try:
        yield it
    finally:
        it.server.shutdown()
        it.server.server_close()


def _remote_schemas(url: str) -> list[tuple[dict[str, Any], str]]:
    return [
        ({"$ref": url}, "grader.schema"),
        ({"type": "object", "properties": {"a": {"$ref": url}}}, "grader.schema"),
        ({"$defs": {"d": {"$dynamicRef": url}}}, "grader.schema"),
        ({"$ref": "file:///etc/passwd"}, "grader.schema"),
        ({"allOf": [{"$ref": "other.json#/x"}]}, "grader.schema"),
    ]


def test_a_remote_ref_is_refused_at_validation_naming_the_field(listener: _Listener) -> None:
    for schema, param in _remote_schemas(listener.url):
        with pytest.raises(InvalidInput) as info:
            parse_grader({"type": "json_schema", "schema": schema})
        assert info.value.param == param, info.value.message
        assert "only local references" in info.value.message
    nested = {"type": "weighted", "graders": [{"grader": {"type": "json_schema", "schema": {"$ref": listener.url}}}]}
    with pytest.raises(InvalidInput) as info:
        parse_grader(nested)
    assert info.value.param == "grader.graders.0.grader.schema", info.value.message
    # Local references still work.
    local = parse_grader(
        {
            "type": "json_schema",
            "schema": {"$defs": {"s": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/s"}}},
        }
    )
    assert local.score('{"a": "x"}', "") == 1.0 and local.score('{"a": 1}', "") == 0.0
    assert listener.requests == []


def test_a_grader_holding_a_remote_ref_fetches_nothing_when_it_scores(listener: _Listener) -> None:
    # Bypass creation's check (model_construct): the validator's own registry must still retrieve nothing.
    for schema, _ in _remote_schemas(listener.url):
        grader = JsonSchema.model_construct(type="json_schema", json_schema=schema)
        assert grader.score('"a string"', "") in (0.0, 1.0) and grader.score('{"a": "x"}', "") in (0.0, 1.0)
    # jsonschema's default registry would have fetched this one (the listener serves {"type": "string"}: a 1).
    root = JsonSchema.model_construct(type="json_schema", json_schema={"$ref": listener.url})
    assert root.score('"a string"', "") == 0.0
    time.sleep(0.2)
    assert listener.requests == []


def test_tenant_regexes_match_in_linear_time() -> None:
    evil = "a" * 50_000 + "!"
    started = time.monotonic()
    check = parse_grader({"type": "string_check", "operation": "regex", "pattern": "^(a+)+$"})
    assert check.score(evil, "") == 0.0 and check.score("aaaa", "") == 1.0
    schema = parse_grader({"type": "json_schema", "schema": {"type": "string", "pattern": "^(a|aa)+$"}})
    assert schema.score(f'"{evil}"', "") == 0.0 and schema.score('"aaa"', "") == 1.0
    names = parse_grader({"type": "json_schema", "schema": {"propertyNames": {"pattern": "^(a+)+$"}}})
    assert names.score('{"' + evil + '": 1}', "") == 0.0 and names.score('{"aa": 1}', "") == 1.0
    assert time.monotonic() - started < 2.0  # Python's `re` takes longer than the age of the universe here
    case = parse_grader({"type": "string_check", "operation": "regex", "pattern": "^{reference}[.!]?$"})
    assert case.score("A.B!", "a.b") == 1.0 and case.score("AxB", "a.b") == 0.0


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "string", "pattern": "(a)\\1"}, "RE2"),
        ({"type": "string", "pattern": "(?=a)"}, "RE2"),
        ({"patternProperties": {"^a": {}}}, "patternProperties"),
    ],
)
def test_schema_regexes_re2_cannot_run_are_a_422(schema: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_grader({"type": "json_schema", "schema": schema})
    assert info.value.param == "grader.schema" and needle in info.value.message, info.value.message


def test_backreferences_in_a_grader_pattern_are_a_422() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_grader({"type": "string_check", "operation": "regex", "pattern": "(a)\\1"})
    assert info.value.param == "grader.pattern" and "RE2" in info.value.message


def test_creating_a_job_with_a_remote_ref_is_a_422_and_fetches_nothing(
    stack: Stack, demo_dataset: dict[str, Any], listener: _Listener
) -> None:
    grader = {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"$ref": listener.url}}}}
    response = stack.client.post(
        "/jobs", json={"dataset_id": demo_dataset["id"], "objective": "grpo", "grader": grader}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "grader.schema", response.text
    time.sleep(0.2)
    assert listener.requests == []
