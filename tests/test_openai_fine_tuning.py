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
    # .data: one page (iterating the client's page object would fetch every page of the tenant's files).
    newest_first = [f.id for f in client.files.list(purpose="fine-tune", limit=2).data]
    assert newest_first == [second.id, created.id]
    page = client.files.list(limit=1, order="asc", after=created.id)
    assert [f.id for f in page.data] != [created.id]
    assert created.id in [f.id for f in client.files.list(order="asc")]  # every page
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


SUPERVISED = {
    "type": "supervised",
    "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2}},
}


def test_supervised_job_is_one_row_in_both_views(stack: Stack, client: openai.OpenAI) -> None:
    training = client.files.create(file=("sft.jsonl", _jsonl(*[CHAT] * 4)), purpose="fine-tune")
    base = stack.settings.served_model_name
    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=training.id,
        suffix="tiny",
        seed=7,
        method=SUPERVISED,  # type: ignore[arg-type]
    )
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-")
    assert (job.model, job.training_file, job.seed) == (base, training.id, 7)
    org = job.organization_id  # the tenant
    assert org.startswith("tn-")
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (1, 4)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)
    assert job.method is not None and job.method.type == "supervised"
    assert job.status in ("queued", "running") and job.fine_tuned_model is None and job.result_files == []

    # The same row through the native API: the multiplier is × the native default learning rate (2e-4).
    native = stack.client.get(f"/jobs/{job.id}").json()
    assert native["hyperparameters"]["learning_rate"] == pytest.approx(4e-4)
    assert native["hyperparameters"]["seed"] == 7

    done = stack.wait_for_job(job.id)
    assert done["status"] == "succeeded", done
    finished = client.fine_tuning.jobs.retrieve(job.id)
    assert finished.status == "succeeded" and finished.finished_at is not None
    assert finished.fine_tuned_model == f"ft:{base}:{org}:tiny:{job.id}"
    assert finished.trained_tokens is not None and finished.trained_tokens > 0
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    ids = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert ids == sorted(ids, reverse=True)  # newest first
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.object == "fine_tuning.job.event" and e.level == "info" for e in events)
    assert isinstance(metrics[0].data, dict) and metrics[0].data["step"] >= 1
    page = client.fine_tuning.jobs.list_events(job.id, limit=1, after=events[0].id)
    assert [e.id for e in page.data] == [events[1].id]

    for checkpoint in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert checkpoint.id.startswith("ftckpt-") and checkpoint.fine_tuning_job_id == job.id
        assert checkpoint.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{checkpoint.step_number}")

    # Cancelling a finished job answers it as it is (never a 409 the client would retry).
    assert client.fine_tuning.jobs.cancel(job.id).status == "succeeded"

    # The ft: name resolves to the job's adapter (this stack runs no serving, so past resolution it is serving's
    # 503); a name that is not this tenant's finished job is a 404 naming model before anything is forwarded.
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with pytest.raises(openai.APIStatusError) as served:
        client.chat.completions.create(model=finished.fine_tuned_model, **chat)  # type: ignore[call-overload]
    assert served.value.status_code not in (404, 422), served.value.message
    for wrong in (
        f"ft:{base}:{org}:other:{job.id}",
        f"ft:{base}:{org}:tiny:ftjob-000000000000000000000000",
        f"{finished.fine_tuned_model}:ckpt-step-1",
    ):
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model=wrong, **chat)  # type: ignore[call-overload]
        assert unknown.value.param == "model"

    # models.retrieve and models.delete: the ft: model is the adapter, deleted for good (served no more).
    assert client.models.retrieve(finished.fine_tuned_model).owned_by == org
    with pytest.raises(openai.BadRequestError):
        client.models.delete(base)
    gone = client.models.delete(finished.fine_tuned_model)
    assert (gone.id, gone.deleted) == (finished.fine_tuned_model, True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=finished.fine_tuned_model, **chat)  # type: ignore[call-overload]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(finished.fine_tuned_model)


def test_a_native_job_is_an_openai_job(stack: Stack, client: openai.OpenAI) -> None:
    training = client.files.create(file=("n.jsonl", _jsonl(CHAT, CHAT)), purpose="fine-tune")
    native = stack.client.post(
        "/jobs",
        json={
            "dataset_id": f"ds-{training.id.removeprefix('file-')}",
            "hyperparameters": {"max_steps": 1, "batch_size": 1, "learning_rate": 1e-4},
        },
    )
    assert native.status_code == 201, native.text
    seen = client.fine_tuning.jobs.retrieve(native.json()["id"])
    assert seen.training_file == training.id
    assert seen.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    cancelled = client.fine_tuning.jobs.cancel(seen.id)
    assert cancelled.id == seen.id
    stack.wait_for_job(seen.id)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"bogus": 1}, "bogus"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"model": "not-served"}, "model"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, None),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}}, None),
    ],
)
def test_job_refusals_are_400s_naming_the_field(
    stack: Stack, client: openai.OpenAI, extra: dict[str, object], param: str | None
) -> None:
    training = client.files.create(file=("r.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    before = len(stack.client.get("/jobs", params={"limit": 100}).json()["data"])
    body: dict[str, object] = {"model": stack.settings.served_model_name, "training_file": training.id, **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        client.post("/fine_tuning/jobs", cast_to=dict, body=body)
    if param is not None:
        assert refused.value.param == param
    else:
        assert str(refused.value.param).startswith("method.supervised.hyperparameters.")
    assert len(stack.client.get("/jobs", params={"limit": 100}).json()["data"]) == before  # nothing half-made


def test_another_tenants_job_and_file_are_not_found(stack: Stack, api_url: str, client: openai.OpenAI) -> None:
    training = client.files.create(file=("t.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    other = openai.OpenAI(
        base_url=f"{api_url}/v1",
        api_key=mint_api_key(stack.settings, f"other-{training.id[-8:]}", new_tenant=True),
        max_retries=0,
    )
    with pytest.raises(openai.NotFoundError) as file_refused:
        other.fine_tuning.jobs.create(model=stack.settings.served_model_name, training_file=training.id)
    assert file_refused.value.param == "training_file"
    job_id = client.fine_tuning.jobs.create(model=stack.settings.served_model_name, training_file=training.id).id
    for call in (other.fine_tuning.jobs.retrieve, other.fine_tuning.jobs.cancel, other.fine_tuning.jobs.list_events):
        with pytest.raises(openai.NotFoundError):
            call(job_id)
    assert job_id not in [j.id for j in other.fine_tuning.jobs.list()]
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(
            model=f"ft:{stack.settings.served_model_name}:tn-default::{job_id}",
            messages=[{"role": "user", "content": "hi"}],
        )
    client.fine_tuning.jobs.cancel(job_id)
    stack.wait_for_job(job_id)
