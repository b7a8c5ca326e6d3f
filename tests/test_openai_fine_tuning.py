"""The OpenAI fine-tuning surface with the official `openai` client, on both database stacks: a file is a dataset
(the same parser, store and tenant checks), its exact bytes come back, and refusals are 4xx naming the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import openai
import pytest

from tests.support.http import api_server
from tests.support.stack import Stack, mint_api_key

CHAT = {
    "messages": [
        {"role": "user", "content": "Is 'great film' positive or negative?"},
        {"role": "assistant", "content": "positive"},
    ]
}


def _jsonl(*rows: object) -> bytes:
    # Spacing the parser does not care about, so a normalised copy would not be byte-equal to the upload.
    return "".join(json.dumps(r, indent=None, separators=(", ", ":  ")) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def api_url(stack: Stack) -> Iterator[str]:
    with api_server(stack.settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(stack: Stack, api_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=stack.api_key, max_retries=0)


def test_files_create_retrieve_content_list_delete(stack: Stack, client: openai.OpenAI) -> None:
    data = _jsonl(CHAT, CHAT, CHAT)
    created = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        len(data),
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data  # the exact bytes, not the parsed rows

    # One row, two views: the file is the native dataset ds-<same hex>.
    native = stack.client.get(f"/datasets/ds-{created.id.removeprefix('file-')}")
    assert native.status_code == 200 and native.json()["splits"] == {"train": 3, "test": 0}

    second = client.files.create(file=("second.jsonl", data), purpose="fine-tune")
    newest_first = [f.id for f in client.files.list(purpose="fine-tune", limit=2)]
    assert newest_first == [second.id, created.id]
    page = client.files.list(limit=1, order="asc", after=created.id)
    assert [f.id for f in page.data] != [created.id]
    assert created.id in [f.id for f in client.files.list(order="asc").data]
    assert client.files.list(purpose="batch").data == []

    deleted = client.files.delete(second.id)
    assert (deleted.id, deleted.deleted) == (second.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(second.id)
    assert stack.client.get(f"/datasets/ds-{second.id.removeprefix('file-')}").status_code == 404


def test_file_refusals_name_the_field_and_leave_nothing(stack: Stack, client: openai.OpenAI) -> None:
    before = [f.id for f in client.files.list()]
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("t.jsonl", _jsonl(CHAT)), purpose="assistants")
    assert purpose.value.status_code == 400 and purpose.value.param == "purpose"

    bad = _jsonl(CHAT) + b'{"messages": "not a list"}\n'
    with pytest.raises(openai.BadRequestError) as line:
        client.files.create(file=("t.jsonl", bad), purpose="fine-tune")
    assert "line 2" in line.value.message and str(line.value.param).startswith("file:2")
    assert [f.id for f in client.files.list()] == before

    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call("file-does-not-exist")


def test_another_tenants_file_is_not_found(stack: Stack, api_url: str, client: openai.OpenAI) -> None:
    mine = client.files.create(file=("mine.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    other = openai.OpenAI(
        base_url=f"{api_url}/v1",
        api_key=mint_api_key(stack.settings, f"other-{mine.id[-8:]}", new_tenant=True),
        max_retries=0,
    )
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    assert mine.id not in [f.id for f in other.files.list()]
    assert client.files.retrieve(mine.id).id == mine.id


def test_a_file_a_job_reads_is_not_deleted(stack: Stack, client: openai.OpenAI) -> None:
    f = client.files.create(file=("used.jsonl", _jsonl(CHAT, CHAT)), purpose="fine-tune")
    job = stack.client.post(
        "/jobs",
        json={"dataset_id": f"ds-{f.id.removeprefix('file-')}", "hyperparameters": {"max_steps": 1, "batch_size": 1}},
    )
    assert job.status_code == 201, job.text
    with pytest.raises(openai.BadRequestError) as in_use:
        client.files.delete(f.id)
    assert job.json()["id"] in in_use.value.message
    assert client.files.retrieve(f.id).id == f.id


def test_async_client_uploads_and_reads_back(stack: Stack, api_url: str) -> None:
    async def flow() -> bytes:
        async with openai.AsyncOpenAI(base_url=f"{api_url}/v1", api_key=stack.api_key, max_retries=0) as aclient:
            created = await aclient.files.create(file=("a.jsonl", _jsonl(CHAT)), purpose="fine-tune")
            return (await aclient.files.content(created.id)).content

    assert asyncio.run(flow()) == _jsonl(CHAT)
