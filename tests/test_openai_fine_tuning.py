"""The OpenAI fine-tuning surface with the official `openai` client, on both database stacks: a file is a dataset
(the same parser, store and tenant checks), its exact bytes come back, and refusals are 4xx naming the field."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.aio import run_async
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


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_file_is_capped_as_an_upload_not_as_a_json_body(stack: Stack) -> None:
    """/v1/files is POST /datasets by another name: max_upload_bytes caps it, not the JSON body cap."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = stack.settings.model_copy(update={"max_json_body_bytes": 16 * 1024, "reconcile_interval_seconds": 0})
    big = _jsonl(*[CHAT] * 400)  # ~40 KiB: past the JSON cap, far under the upload cap
    assert settings.max_json_body_bytes < len(big) < settings.max_upload_bytes
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {stack.api_key}"}) as http:
        response = http.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        assert response.json()["bytes"] == len(big)


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

    assert run_async(flow()) == _jsonl(CHAT)


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
        metadata={"stack": stack.kind, "flow": "both-views"},
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
    # The metadata filter in SQL, on either database: every given pair must match.
    listed = client.fine_tuning.jobs.list(metadata={"stack": stack.kind, "flow": "both-views"}).data
    assert [j.id for j in listed] == [job.id] and listed[0].metadata == {"stack": stack.kind, "flow": "both-views"}
    assert client.fine_tuning.jobs.list(metadata={"stack": stack.kind, "flow": "other"}).data == []
    assert stack.client.get(f"/jobs/{job.id}").json()["metadata"] == {"stack": stack.kind, "flow": "both-views"}

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
        f"{finished.fine_tuned_model}:ckpt-step-999",  # a step with no published checkpoint
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
        ({"method": {"type": "reinforcement"}}, "method.reinforcement.grader"),
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "source": "x"}}}},
            "method.reinforcement.grader.type",
        ),
        ({"suffix": "has space"}, "suffix"),
        ({"peft": "magic"}, "peft"),
        ({"hyperparameters": {"bogus_knob": 1}}, "hyperparameters.bogus_knob"),
        ({"hyperparameters": {"learning_rate": 0.1}}, "hyperparameters.learning_rate"),  # the multiplier's
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_r": 7}}}}, None),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
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


def test_unstorable_metadata_is_a_400_naming_it(stack: Stack, client: openai.OpenAI) -> None:
    training = client.files.create(file=("u.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    body = '{"model": "%s", "training_file": "%s", "metadata": {"k": "\\ud800"}}'
    response = stack.client.post(
        "/v1/fine_tuning/jobs",
        content=(body % (stack.settings.served_model_name, training.id)).encode(),
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["error"]["param"]) == (400, "metadata.k"), response.text
    many = stack.client.get("/v1/fine_tuning/jobs", params={f"metadata[k{i}]": "v" for i in range(17)})
    assert (many.status_code, many.json()["error"]["param"]) == (400, "metadata"), many.text


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
    own = other.files.create(file=("o.jsonl", _jsonl(CHAT)), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError) as validation_refused:
        other.fine_tuning.jobs.create(
            model=stack.settings.served_model_name, training_file=own.id, validation_file=training.id
        )
    assert validation_refused.value.param == "validation_file"
    job_id = client.fine_tuning.jobs.create(model=stack.settings.served_model_name, training_file=training.id).id
    for call in (
        other.fine_tuning.jobs.retrieve,
        other.fine_tuning.jobs.cancel,
        other.fine_tuning.jobs.list_events,
        other.fine_tuning.jobs.checkpoints.list,
    ):
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


def _labelled(text: str, label: str) -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": f"Is '{text}' positive or negative?"},
            {"role": "assistant", "content": label},
        ]
    }


TRAIN_ROWS = [_labelled(t, lab) for t, lab in [("great", "positive"), ("awful", "negative")] * 4]
VALID_ROWS = [_labelled("lovely", "positive"), _labelled("dreadful", "negative")]
PAIR = {
    "input": {"messages": [{"role": "user", "content": "Is 'great film' positive or negative?"}]},
    "preferred_output": [{"role": "assistant", "content": "positive"}],
    "non_preferred_output": [{"role": "assistant", "content": "negative"}],
}


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_script_flow_validation_results_checkpoints_then_dpo(stack: Stack, client: openai.OpenAI) -> None:
    """The issue's script: files -> supervised job with a validation file -> events, checkpoints and the results
    file -> the ft: name and its checkpoints as models -> DPO continued from the ft: model."""
    started = time.monotonic()
    training = client.files.create(file=("train.jsonl", _jsonl(*TRAIN_ROWS)), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", _jsonl(*VALID_ROWS)), purpose="fine-tune")
    suffix = "s" * 64  # OpenAI's longest
    base = stack.settings.served_model_name
    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=training.id,
        validation_file=validation.id,
        suffix=suffix,
        seed=3,
        metadata={"team": "search", "run": "a"},
        # 8 rows / 4 a step: 2 steps an epoch, a checkpoint each epoch; a native knob and the PEFT choice ride along.
        method={  # type: ignore[arg-type]
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4, "lora_r": 16}},
        },
        extra_body={"peft": "lora"},
    )
    native_spec = stack.client.get(f"/jobs/{job.id}").json()
    assert (native_spec["method"], native_spec["hyperparameters"]["lora_r"]) == ("lora", 16)
    assert (job.validation_file, job.metadata) == (validation.id, {"team": "search", "run": "a"})
    assert job.hyperparameters.learning_rate_multiplier == 1.0  # "auto": the native default learning rate
    assert stack.wait_for_job(job.id)["status"] == "succeeded"
    done = client.fine_tuning.jobs.retrieve(job.id)
    ft = f"ft:{base}:{done.organization_id}:{suffix}:{job.id}"
    assert done.fine_tuned_model == ft and done.estimated_finish is None and done.finished_at is not None
    assert (done.hyperparameters.n_epochs, done.hyperparameters.batch_size) == (3, 4)

    assert job.id in [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"}).data]
    assert job.id not in [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "ads"}).data]

    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    data = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict)]
    valid: list[dict[str, Any]] = [d for d in data if "valid_loss" in d]
    assert valid and all(d["valid_loss"] > 0 and 0 <= d["valid_mean_token_accuracy"] <= 1 for d in valid)
    assert max(d["step"] for d in valid) == 6  # the final step's validation pass

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 4, 2]  # one an epoch, newest first
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [f"{ft}:ckpt-step-{n}" for n in (6, 4, 2)]
    assert checkpoints[0].metrics.full_valid_loss is not None and checkpoints[0].metrics.valid_loss is not None
    assert all(c.metrics.train_loss is not None for c in checkpoints)

    (results_id,) = done.result_files
    results = client.files.retrieve(results_id)
    assert results.purpose == "fine-tune-results"
    assert results_id in [f.id for f in client.files.list(purpose="fine-tune-results").data]
    rows = list(csv.DictReader(io.StringIO(client.files.content(results_id).text)))
    assert len(client.files.content(results_id).content) == results.bytes
    assert list(rows[0]) == ["step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                             "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy"]  # fmt: skip
    assert rows[0]["train_loss"] and rows[0]["train_mean_token_accuracy"]
    assert rows[-1]["step"] == "6" and rows[-1]["full_valid_loss"] and rows[-1]["full_valid_mean_token_accuracy"]
    with pytest.raises(openai.BadRequestError):
        client.files.delete(results_id)

    listed = {m.id for m in client.models.list()}
    assert {ft, f"{ft}:ckpt-step-2", f"{ft}:ckpt-step-4"} <= listed
    assert client.models.retrieve(f"{ft}:ckpt-step-4").owned_by == done.organization_id
    chat = {"messages": [{"role": "user", "content": "Is 'great' positive or negative?"}], "max_tokens": 1}
    for name in (ft, f"{ft}:ckpt-step-2"):
        # Resolved to the adapter (this stack runs no serving, so past resolution it is serving's 503).
        with pytest.raises(openai.APIStatusError) as served:
            client.chat.completions.create(model=name, **chat)  # type: ignore[call-overload]
        assert served.value.status_code == 503, served.value.message

    pairs = client.files.create(file=("pairs.jsonl", _jsonl(PAIR, PAIR, PAIR, PAIR)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as no_validation:
        client.fine_tuning.jobs.create(
            model=ft, training_file=pairs.id, validation_file=validation.id, method={"type": "dpo"}
        )
    assert no_validation.value.param == "validation_file"
    dpo = client.fine_tuning.jobs.create(
        model=ft,
        training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}},
    )
    assert dpo.method is not None and dpo.method.type == "dpo" and dpo.method.dpo is not None
    assert dpo.method.dpo.hyperparameters is not None and dpo.method.dpo.hyperparameters.beta == 0.2
    native = stack.wait_for_job(dpo.id)
    assert native["status"] == "succeeded" and native["objective"] == "dpo", native
    assert native["init_adapter"] == stack.client.get(f"/jobs/{job.id}").json()["fine_tuned_model"]
    assert client.fine_tuning.jobs.retrieve(dpo.id).fine_tuned_model is not None

    # A checkpoint is a model to continue from too (its adapter is the new job's init_adapter).
    from_checkpoint = client.fine_tuning.jobs.create(model=f"{ft}:ckpt-step-2", training_file=training.id)
    assert stack.client.get(f"/jobs/{from_checkpoint.id}").json()["init_adapter"].endswith("-step-2")
    client.fine_tuning.jobs.cancel(from_checkpoint.id)
    stack.wait_for_job(from_checkpoint.id)
    print(f"\n[{stack.kind}] the issue's script end to end (no serving): {time.monotonic() - started:.1f} s")


def test_model_aliases_name_the_base() -> None:
    from core.settings import Settings

    settings = Settings(data_dir="/tmp/tuneserve-alias", base_model="/m/tiny", model_aliases="gpt-4o-mini=tiny")
    assert settings.names_base_model("gpt-4o-mini") and settings.names_base_model("tiny")
    assert not settings.names_base_model("gpt-4o")
    for bad in ("gpt-4o-mini", "gpt-4o-mini=other", "=tiny"):
        with pytest.raises(ValueError, match="model_aliases"):
            Settings(data_dir="/tmp/tuneserve-alias", base_model="/m/tiny", model_aliases=bad)


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_the_same_training_through_either_view_learns_the_same(
    stack: Stack, client: openai.OpenAI, demo_files: tuple[Path, Path], demo_dataset: dict[str, Any]
) -> None:
    """OpenAI's n_epochs, batch_size and learning_rate_multiplier train as the equivalent POST /jobs does: the same
    held-out exact match and loss on the demo task's test split."""
    # 64 of the demo task's rows: 4 steps an epoch at 16 rows a step, as few as the comparison needs.
    rows = demo_files[0].read_bytes().splitlines(keepends=True)[:64]
    training = client.files.create(file=("demo.jsonl", b"".join(rows)), purpose="fine-tune")
    via_openai = client.fine_tuning.jobs.create(
        model=stack.settings.served_model_name,
        training_file=training.id,
        seed=0,
        method={
            "type": "supervised",
            # 25 x the native 2e-4: 5e-3.
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": 25}},
        },
    )
    native = stack.client.post(
        "/jobs",
        json={
            "dataset_id": f"ds-{training.id.removeprefix('file-')}",
            "hyperparameters": {"n_epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "seed": 0},
            "evaluation": {"enabled": False},
        },
    )
    assert native.status_code == 201, native.text
    results = []
    for job_id in (via_openai.id, native.json()["id"]):
        done = stack.wait_for_job(job_id)
        assert done["status"] == "succeeded", done
        evaluation = stack.client.post(
            "/evaluations",
            json={
                "dataset_id": demo_dataset["id"],
                "adapter": done["fine_tuned_model"],
                "metrics": ["exact_match", "loss"],
                "batch_size": 32,
                "max_new_tokens": 6,
            },
        )
        assert evaluation.status_code == 201, evaluation.text
        results.append(_finished_evaluation(stack, evaluation.json()["id"])["results"][0]["metrics"])
    print(
        f"\n[{stack.kind}] held-out exact match: /v1 {results[0]['exact_match']:.3f}, /jobs {results[1]['exact_match']:.3f}"
    )
    assert results[0]["exact_match"] == results[1]["exact_match"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-4)


def _finished_evaluation(stack: Stack, evaluation_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = stack.client.get(f"/evaluations/{evaluation_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            assert body["status"] == "succeeded", body
            return body
        time.sleep(0.25)
    raise AssertionError(f"evaluation {evaluation_id} not done in {timeout}s")


def test_the_ft_model_and_its_checkpoint_answer_through_serving(serving_stack: Stack) -> None:
    """On real serving (vLLM): the ft: name and a checkpoint name answer chat and completions like any adapter."""
    stack = serving_stack
    with api_server(stack.settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=stack.api_key, max_retries=0)
        stack.start_worker()
        started = time.monotonic()
        training = client.files.create(file=("train.jsonl", _jsonl(*TRAIN_ROWS)), purpose="fine-tune")
        try:
            job = client.fine_tuning.jobs.create(
                model=stack.settings.served_model_name,
                training_file=training.id,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
            )
            assert stack.wait_for_job(job.id)["status"] == "succeeded"
        finally:
            stack.stop_worker()
        ft = client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
        assert ft is not None
        messages = [{"role": "user", "content": "Is 'great' positive or negative?"}]
        for name in (ft, f"{ft}:ckpt-step-1"):
            chat = client.chat.completions.create(model=name, messages=messages, max_tokens=2, temperature=0)  # type: ignore[arg-type]
            assert isinstance(chat.choices[0].message.content, str)
            completion = client.completions.create(model=name, prompt="positive or", max_tokens=2, temperature=0)
            assert isinstance(completion.choices[0].text, str)
        print(
            f"\n[serving] upload, train, chat and complete with the ft: model and a checkpoint: {time.monotonic() - started:.1f} s"
        )


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_reinforcement_is_a_grpo_job_rewarded_by_the_openai_grader(stack: Stack, client: openai.OpenAI) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris"},
        {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"},
    ] * 2
    training = client.files.create(file=("rft.jsonl", _jsonl(*rows)), purpose="fine-tune")
    grader = {
        "type": "string_check",
        "name": "check",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "ne",
    }
    job = client.fine_tuning.jobs.create(
        model=stack.settings.served_model_name,
        training_file=training.id,
        method={  # type: ignore[arg-type]
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {"n_epochs": 1, "batch_size": 4}},
        },
    )
    assert job.method is not None and job.method.type == "reinforcement"
    native = stack.wait_for_job(job.id, timeout=300)
    assert native["status"] == "succeeded", native
    assert native["objective"] == "grpo" and native["grader"]["type"] == "openai"
    assert native["grader"]["grader"]["operation"] == "ne"
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is not None
