"""POST /datasets: every format accepted, every bad line refused with its line and field, nothing stored on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.stack import Stack


def _jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _stored_state(stack: Stack) -> tuple[int, list[str]]:
    listing = stack.client.get("/datasets", params={"limit": 100}).json()
    files = sorted(p.name for p in (stack.settings.store / "datasets").iterdir())
    return len(listing["data"]), files


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
}


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (CHAT, "chat"),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        ({"instruction": "Add", "input": "2 2", "output": "4"}, "instruction"),
    ],
)
def test_upload_each_format(stack: Stack, row: dict, fmt: str) -> None:
    response = stack.client.post(
        "/datasets", files={"file": ("d.jsonl", _jsonl(*[row] * 10))}, data={"test_fraction": "0.2", "seed": "7"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == fmt
    assert body["splits"] == {"train": 8, "test": 2}
    assert (body["split_source"], body["test_fraction"], body["seed"]) == ("fraction", 0.2, 7)
    assert body["stats"]["train"]["rows"] == 8
    stored = stack.settings.store / "datasets" / body["id"]
    lines = (stored / "train.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["messages"][-1]["role"] == "assistant"
    assert stack.client.get(f"/datasets/{body['id']}").json()["id"] == body["id"]


def test_split_with_a_seed_is_reproducible(stack: Stack) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    ids = []
    for _ in range(2):
        r = stack.client.post(
            "/datasets", files={"file": ("d.jsonl", _jsonl(*rows))}, data={"test_fraction": "0.25", "seed": "3"}
        )
        assert r.status_code == 201
        ids.append(r.json()["id"])
    texts = [(stack.settings.store / "datasets" / i / "test.jsonl").read_text() for i in ids]
    assert texts[0] == texts[1] and texts[0].count("\n") == 5


def test_demo_dataset_keeps_its_uploaded_test_split(demo_dataset: dict) -> None:
    assert demo_dataset["split_source"] == "file"
    assert demo_dataset["splits"] == {"train": 256, "test": 32}


BAD = [
    (b'{"prompt": "a", "completion": "b"}\nnot json\n', 422, "file:2:json", "line 2"),
    (_jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a"}), 422, "file:2:completion", "completion"),
    (
        _jsonl({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        422,
        "file:1:messages[0].role",
        "bot",
    ),
    (b"", 422, "file:file", "no rows"),
    (b"\n\n  \n", 422, "file:file", "no rows"),
    (
        _jsonl({"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"})
        + b'{"prompt": "\xff\xfe", "completion": "x"}\n',
        422,
        "file:3:encoding",
        "UTF-8",
    ),
    (_jsonl({"messages": [{"role": "user", "content": "hi"}]}), 422, "file:1:messages[0].role", "assistant"),
    (
        _jsonl({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}),
        422,
        "file:1:messages[0].content",
        "string",
    ),
]


@pytest.mark.parametrize(("payload", "status", "param", "phrase"), BAD)
def test_bad_dataset_is_refused_and_nothing_is_stored(
    stack: Stack, payload: bytes, status: int, param: str, phrase: str
) -> None:
    before = _stored_state(stack)
    response = stack.client.post("/datasets", files={"file": ("bad.jsonl", payload)})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert phrase.lower() in error["message"].lower()
    assert _stored_state(stack) == before


def test_oversized_upload_is_413_and_nothing_is_stored(stack: Stack) -> None:
    before = _stored_state(stack)
    row = _jsonl({"prompt": "x" * 1000, "completion": "y"})
    payload = row * (stack.settings.max_upload_bytes // len(row) + 2)
    response = stack.client.post("/datasets", files={"file": ("big.jsonl", payload)})
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "file"
    assert _stored_state(stack) == before


def test_bad_test_file_names_the_test_file(stack: Stack) -> None:
    before = _stored_state(stack)
    response = stack.client.post(
        "/datasets", files={"file": ("a.jsonl", _jsonl(CHAT)), "test_file": ("t.jsonl", b"{oops\n")}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "test_file:1:json"
    assert _stored_state(stack) == before


def test_fraction_and_test_file_together_are_refused(stack: Stack) -> None:
    response = stack.client.post(
        "/datasets",
        files={"file": ("a.jsonl", _jsonl(CHAT, CHAT)), "test_file": ("t.jsonl", _jsonl(CHAT))},
        data={"test_fraction": "0.5"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "test_fraction"


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "abc"])
def test_bad_fraction_names_the_field(stack: Stack, fraction: str) -> None:
    response = stack.client.post(
        "/datasets", files={"file": ("a.jsonl", _jsonl(CHAT, CHAT))}, data={"test_fraction": fraction}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "test_fraction"


def test_missing_file_field(stack: Stack) -> None:
    response = stack.client.post("/datasets", data={"seed": "1"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "file"


def test_unknown_dataset_is_404(stack: Stack) -> None:
    response = stack.client.get("/datasets/ds-nope")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "type": "not_found_error",
        "code": "not_found",
        "message": "no dataset with id 'ds-nope'",
        "param": "dataset_id",
    }


def test_dataset_listing_paginates(stack: Stack) -> None:
    for _ in range(3):
        assert stack.client.post("/datasets", files={"file": ("d.jsonl", _jsonl(CHAT))}).status_code == 201
    first = stack.client.get("/datasets", params={"limit": 2}).json()
    assert len(first["data"]) == 2 and first["has_more"] is True
    second = stack.client.get("/datasets", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert {d["id"] for d in first["data"]}.isdisjoint({d["id"] for d in second["data"]})


def test_health_and_readiness(stack: Stack, tmp_path: Path) -> None:
    assert stack.client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = stack.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
