"""Evaluations end to end on both stacks: one demo job trained per stack, then before/after, sweep, derive, merge."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.adapter_ops import LoraScaler, load_adapter, load_base_model
from core.demo_data import user_prompt
from core.evaluation.inference import chat_prompts, generate_greedy
from core.storage import sha256_file
from tests.support.stack import Stack

# The model-quality chain (the 300-step demo job, its evaluations, sweep, derive and merge) runs on one stack: what a
# model learns does not depend on the database, and every route it uses runs on both stacks in the other modules.
pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

# What scripts/demo.py found to take the tiny model from 0% to ~100% on the demo task.
DEMO = {
    "max_steps": int(os.environ.get("TUNESERVE_TEST_DEMO_STEPS", "300")),
    "learning_rate": 3e-3,
    "batch_size": 16,
    "lora_r": 8,
    "lora_alpha": 16,
    "seed": 0,
}
EVAL = {"batch_size": 32, "max_new_tokens": 6}
SWEEP = [0.0, 0.5, 1.0, 1.5]


def wait_for(stack: Stack, path: str, *, timeout: float = 300, done: Any = None) -> dict[str, Any]:
    """Poll GET path until done(body) (default: a terminal status)."""
    done = done or (lambda body: body["status"] in ("succeeded", "failed"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = stack.client.get(path).json()
        if done(body):
            return body
        if stack.worker is not None and stack.worker.poll() is not None:
            raise AssertionError(f"worker exited with {stack.worker.returncode}; log: {stack.worker_log}")
        time.sleep(0.25)
    raise AssertionError(f"{path} not done in {timeout}s: {body}")


@pytest.fixture(scope="session")
def demo_job(stack: Stack, demo_dataset: dict) -> dict[str, Any]:
    """The one long training job of this stack, finished with its before/after evaluation."""
    body = {"dataset_id": demo_dataset["id"], "hyperparameters": DEMO, "suffix": "eval", "evaluation": EVAL}
    response = stack.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job = stack.wait_for_job(response.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    return wait_for(stack, f"/jobs/{job['id']}", done=lambda j: j["evaluation"]["status"] in ("succeeded", "failed"))


@pytest.fixture(scope="session")
def sweep(stack: Stack, demo_job: dict, demo_dataset: dict) -> dict[str, Any]:
    body = {
        "dataset_id": demo_dataset["id"],
        "adapter": demo_job["fine_tuned_model"],
        "scales": SWEEP,
        "metrics": ["exact_match", "contains", "loss"],
        **EVAL,
    }
    response = stack.client.post("/evaluations", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "queued"
    return wait_for(stack, f"/evaluations/{response.json()['id']}")


def _predictions(stack: Stack, evaluation_id: str, scale: float | None = None) -> list[str]:
    params: dict[str, Any] = {"limit": 500}
    if scale is not None:
        params["scale"] = scale
    page = stack.client.get(f"/evaluations/{evaluation_id}/samples", params=params).json()
    assert not page["has_more"]
    return [s["prediction"] for s in sorted(page["data"], key=lambda s: s["index"])]


def test_job_report_shows_base_vs_adapter_on_the_test_split(stack: Stack, demo_job: dict, demo_dataset: dict) -> None:
    summary = demo_job["evaluation"]
    assert summary["status"] == "succeeded", summary
    report = stack.client.get(f"/jobs/{demo_job['id']}/report").json()
    assert report["n_examples"] == demo_dataset["splits"]["test"] == 32
    metrics = {m["name"]: m for m in report["metrics"]}
    assert set(metrics) == {"exact_match", "contains", "rouge1", "rouge2", "rougeL", "token_f1", "loss", "perplexity"}
    em = metrics["exact_match"]
    print(
        f"\n[{stack.kind}] demo task exact match: base {em['base']:.3f} -> adapter {em['adapter']:.3f}; "
        f"loss {metrics['loss']['base']:.3f} -> {metrics['loss']['adapter']:.3f}"
    )
    assert em["base"] <= 0.10 and em["adapter"] >= 0.90
    assert em["delta"] == pytest.approx(em["adapter"] - em["base"]) and em["improved"] is True
    assert metrics["loss"]["lower_is_better"] and metrics["loss"]["delta"] < 0 and metrics["loss"]["improved"]
    assert metrics["perplexity"]["adapter"] < metrics["perplexity"]["base"]
    assert summary["adapter"]["exact_match"] == em["adapter"] and summary["delta"]["exact_match"] == em["delta"]
    assert len(report["examples"]) == 5 and all(e["reference"] in ("positive", "negative") for e in report["examples"])
    base = stack.client.get(f"/evaluations/{summary['base_evaluation_id']}").json()
    assert base["adapter"] is None and base["role"] == "base" and base["job_id"] == demo_job["id"]
    assert base["progress"] == {"done_examples": 32, "total_examples": 32} and base["duration_seconds"] > 0


def test_the_test_split_is_never_trained_on(stack: Stack, demo_job: dict, demo_dataset: dict) -> None:
    events = stack.client.get(f"/jobs/{demo_job['id']}/events", params={"limit": 1000}).json()["data"]
    trained = [e["message"] for e in events if e["message"].endswith("truncated to 512 tokens")]
    # The training child reads train.jsonl only: it counted exactly the train split's rows.
    assert trained and trained[0].startswith(f"{demo_dataset['splits']['train']} training examples")
    stored = stack.settings.store / "datasets" / demo_dataset["id"]
    train_prompts = {user_prompt(json.loads(line)) for line in (stored / "train.jsonl").read_text().splitlines()}
    test_rows = [json.loads(line) for line in (stored / "test.jsonl").read_text().splitlines()]
    assert len(test_rows) == 32 and not train_prompts & {user_prompt(r) for r in test_rows}
    samples = stack.client.get(
        f"/evaluations/{demo_job['evaluation']['adapter_evaluation_id']}/samples", params={"limit": 500}
    ).json()["data"]
    assert {s["reference"] for s in samples} <= {"positive", "negative"} and len(samples) == 32
    # What the evaluation asked the model are the test prompts, none of them a training prompt.
    asked = {s["prompt"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0] for s in samples}
    assert asked == {user_prompt(r) for r in test_rows} and not asked & train_prompts


def test_scale_sweep_and_scale_zero_is_the_base_model(stack: Stack, demo_job: dict, sweep: dict) -> None:
    assert sweep["status"] == "succeeded", sweep
    assert [r["scale"] for r in sweep["results"]] == SWEEP
    em = {r["scale"]: r["metrics"]["exact_match"] for r in sweep["results"]}
    print(f"\n[{stack.kind}] exact match by adapter scale: {em}")
    assert em[0.0] <= 0.10 and em[1.0] >= 0.90
    assert set(sweep["results"][0]["metrics"]) == {"exact_match", "contains", "loss"}
    base_id = demo_job["evaluation"]["base_evaluation_id"]
    assert _predictions(stack, sweep["id"], 0.0) == _predictions(stack, base_id)
    assert _predictions(stack, sweep["id"], 1.0) == _predictions(stack, demo_job["evaluation"]["adapter_evaluation_id"])
    # Teacher-forced loss at s = 0 is the base model's loss.
    base = stack.client.get(f"/evaluations/{base_id}").json()
    assert sweep["results"][0]["metrics"]["loss"] == pytest.approx(base["results"][0]["metrics"]["loss"], rel=1e-5)


def test_samples_are_paginated(stack: Stack, sweep: dict) -> None:
    path = f"/evaluations/{sweep['id']}/samples"
    first = stack.client.get(path, params={"limit": 50}).json()
    assert first["total"] == 4 * 32 and first["has_more"] and len(first["data"]) == 50
    rest = stack.client.get(path, params={"limit": 500, "offset": 50}).json()
    assert not rest["has_more"] and len(rest["data"]) == 78
    keys = [(s["scale"], s["index"]) for s in first["data"] + rest["data"]]
    assert len(set(keys)) == 128 and keys == sorted(keys)
    one = stack.client.get(path, params={"scale": 1.5, "limit": 5}).json()
    assert one["total"] == 32 and {s["scale"] for s in one["data"]} == {1.5}
    sample = one["data"][0]
    assert {"prompt", "reference", "prediction", "scores"} <= set(sample)
    assert set(sample["scores"]) == {"exact_match", "contains", "loss"}
    assert "<|im_start|>assistant" in sample["prompt"]
    bad = stack.client.get(path, params={"scale": 2.0})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "scale"


def test_derived_adapter_equals_the_adapter_at_that_scale(
    stack: Stack, demo_job: dict, demo_dataset: dict, sweep: dict
) -> None:
    name = demo_job["fine_tuned_model"]
    response = stack.client.post(f"/adapters/{name}/derive", json={"scale": 0.5})
    assert response.status_code == 202, response.text
    op = wait_for(stack, f"/adapter-operations/{response.json()['id']}")
    assert op["status"] == "succeeded", op
    derived = stack.client.get(f"/adapters/{op['result']}").json()
    assert derived["name"] != name and derived["parent"] == name and derived["scale"] == 0.5
    assert derived["method"] == "lora" and derived["servable"] and derived["rank"] == 8
    adapter_dir = stack.settings.store / "adapters" / derived["name"]
    for file, digest in derived["files"].items():
        assert sha256_file(adapter_dir / file) == digest
    assert not list((stack.settings.store / "tmp").iterdir())
    body = {"dataset_id": demo_dataset["id"], "adapter": derived["name"], "metrics": ["exact_match"], **EVAL}
    evaluation = wait_for(stack, f"/evaluations/{stack.client.post('/evaluations', json=body).json()['id']}")
    assert evaluation["status"] == "succeeded", evaluation
    assert _predictions(stack, evaluation["id"], 1.0) == _predictions(stack, sweep["id"], 0.5)


def test_merged_model_equals_base_plus_scaled_adapter(
    stack: Stack, demo_job: dict, demo_dataset: dict, sweep: dict, model_dir: Path
) -> None:
    name = demo_job["fine_tuned_model"]
    op = wait_for(
        stack, f"/adapter-operations/{stack.client.post(f'/adapters/{name}/merge', json={'scale': 0.5}).json()['id']}"
    )
    assert op["status"] == "succeeded", op
    merged = stack.client.get(f"/adapters/{op['result']}").json()
    assert merged["method"] == "merged" and merged["servable"] is False and merged["parent"] == name
    merged_dir = stack.settings.store / "adapters" / merged["name"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(merged["files"])
    for file, digest in merged["files"].items():
        assert sha256_file(merged_dir / file) == digest

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [
        json.loads(line)["messages"]
        for line in (stack.settings.store / "datasets" / demo_job["dataset_id"] / "test.jsonl")
        .read_text()
        .splitlines()[:8]
    ]
    prompts = chat_prompts(tokenizer, rows)
    tuned = load_adapter(load_base_model(str(model_dir)), stack.settings.store / "adapters" / name)
    LoraScaler(tuned).set_scale(0.5)
    expected = generate_greedy(tuned, tokenizer, prompts, batch_size=8, max_new_tokens=6)
    full = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert generate_greedy(full, tokenizer, prompts, batch_size=8, max_new_tokens=6) == expected

    # The worker evaluates a merged model as a whole model: the same predictions as the sweep at 0.5.
    body = {"dataset_id": demo_dataset["id"], "adapter": merged["name"], "metrics": ["exact_match"], **EVAL}
    evaluation = wait_for(stack, f"/evaluations/{stack.client.post('/evaluations', json=body).json()['id']}")
    assert evaluation["status"] == "succeeded", evaluation
    assert _predictions(stack, evaluation["id"], 1.0) == _predictions(stack, sweep["id"], 0.5)
    refused = stack.client.post("/evaluations", json=dict(body, scales=[0.5]))
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "scales"
    derive = stack.client.post(f"/adapters/{merged['name']}/derive", json={"scale": 0.5})
    assert derive.status_code == 422 and derive.json()["error"]["param"] == "name"


def test_bad_input_is_refused_naming_the_field(
    stack: Stack, demo_job: dict, demo_dataset: dict, demo_files: tuple
) -> None:
    adapter = demo_job["fine_tuned_model"]
    ds = demo_dataset["id"]

    def refused(body: dict, status: int, param: str) -> None:
        response = stack.client.post("/evaluations", json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param, response.json()

    before = stack.client.get("/evaluations", params={"limit": 100}).json()["data"]
    refused({"dataset_id": "ds-nope"}, 404, "dataset_id")
    refused({"dataset_id": ds, "adapter": "no-such-adapter"}, 404, "adapter")
    refused({"dataset_id": ds, "split": "validation"}, 422, "split")
    refused({"dataset_id": ds, "scales": [1.0]}, 422, "scales")
    refused({"dataset_id": ds, "adapter": adapter, "scales": [0.5, -1]}, 422, "scales[1]")
    refused({"dataset_id": ds, "adapter": adapter, "scales": [0.5, 0.5]}, 422, "scales[1]")
    refused({"dataset_id": ds, "adapter": adapter, "scales": []}, 422, "scales")
    refused({"dataset_id": ds, "batch_size": 0}, 422, "batch_size")
    refused({"dataset_id": ds, "batch_size": 4096}, 422, "batch_size")
    refused({"dataset_id": ds, "max_new_tokens": 0}, 422, "max_new_tokens")
    refused({"dataset_id": ds, "metrics": ["bleu"]}, 422, "metrics[0]")
    refused({"dataset_id": ds, "metrics": []}, 422, "metrics")
    refused({"dataset_id": ds, "temperature": 1}, 422, "temperature")
    with demo_files[0].open("rb") as f:
        no_test = stack.client.post("/datasets", files={"file": ("train.jsonl", f)}).json()
    refused({"dataset_id": no_test["id"]}, 422, "split")
    assert stack.client.get("/evaluations", params={"limit": 100}).json()["data"] == before

    assert stack.client.get("/evaluations/eval-nope").status_code == 404
    assert stack.client.get("/adapter-operations/adop-nope").status_code == 404
    missing = stack.client.post("/adapters/no-such-adapter/derive", json={"scale": 0.5})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
    for bad in ({"scale": -0.5}, {"scale": 11}, {}):
        response = stack.client.post(f"/adapters/{adapter}/merge", json=bad)
        assert response.status_code == 422 and response.json()["error"]["param"] == "scale", response.text
    job = stack.client.post("/jobs", json={"dataset_id": ds, "evaluation": {"enabled": False, "batch_size": 0}})
    assert job.status_code == 422 and job.json()["error"]["param"] == "evaluation.batch_size"
