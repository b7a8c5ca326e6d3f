"""Preference and reward objectives end to end through the real worker, on the tiny model and the demo task's pairs.

A weak SFT adapter (trained on the chosen answers for a few steps) is continued with DPO (init_adapter), and a partly
right one (a few more steps) with GRPO (a string_check grader against the reference column); each job's before/after
evaluation compares the adapter it started from with the one it made, on held-out pairs. KTO and ORPO train a fresh
adapter for a few steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from core.demo_data import write_demo_preference_dataset
from core.statuses import TERMINAL_STATUSES
from tests.support.stack import Stack

TRAIN = {"learning_rate": 3e-3, "batch_size": 16, "seed": 0, "max_seq_length": 64}
WEAK_SFT_STEPS = int(os.environ.get("TUNESERVE_TEST_WEAK_SFT_STEPS", "40"))
PARTLY_RIGHT_SFT_STEPS = int(os.environ.get("TUNESERVE_TEST_PARTLY_RIGHT_SFT_STEPS", "120"))
EVAL = {"batch_size": 32, "max_new_tokens": 4, "metrics": ["exact_match", "contains"]}
GRADER = {"type": "string_check", "operation": "equals", "reference": "reference"}


@pytest.fixture(scope="session")
def preference_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_preference_dataset(tmp_path_factory.mktemp("preference"), n_train=256, n_test=32, seed=0)


@pytest.fixture(scope="session")
def preference_dataset(stack: Stack, preference_files: tuple[Path, Path]) -> dict[str, Any]:
    train, test = preference_files
    with train.open("rb") as f, test.open("rb") as t:
        response = stack.client.post("/datasets", files={"file": ("pairs.jsonl", f), "test_file": ("test.jsonl", t)})
    assert response.status_code == 201, response.text
    return dict(response.json())


# The model-quality chains (SFT -> DPO, SFT -> GRPO) run on one stack: what a model learns does not depend on the
# database; the routes and records they use are exercised on both stacks by the other tests here.
ONE_STACK = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def run_job(stack: Stack, body: dict[str, Any], *, evaluated: bool = False, timeout: float = 600) -> dict[str, Any]:
    response = stack.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job = stack.wait_for_job(response.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", job
    if not evaluated:
        return job
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.client.get(f"/jobs/{job['id']}").json()
        if job["evaluation"]["status"] in TERMINAL_STATUSES:
            assert job["evaluation"]["status"] == "succeeded", job
            return job
        time.sleep(0.5)
    raise AssertionError(f"evaluation of {job['id']} not done in {timeout}s")


def metric_events(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    events = stack.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e for e in events if e["type"] == "metrics"]


@pytest.fixture(scope="session")
def weak_sft(stack: Stack, preference_dataset: dict[str, Any]) -> dict[str, Any]:
    """SFT on the pairs' chosen answers, stopped early: it answers with a label, not yet reliably the right one."""
    body = {
        "dataset_id": preference_dataset["id"],
        "suffix": "weak",
        "hyperparameters": {**TRAIN, "max_steps": WEAK_SFT_STEPS},
        "evaluation": {"enabled": False},
    }
    return run_job(stack, body)


@pytest.fixture(scope="session")
def partly_right_sft(stack: Stack, preference_dataset: dict[str, Any]) -> dict[str, Any]:
    """SFT stopped when its greedy label is right on most held-out prompts (0.84) but sampling at temperature 1 still
    gives the wrong label about a quarter of the time: GRPO's groups then hold right and wrong answers to the same prompt,
    so its advantage depends on the prompt. (From the 40-step adapter, sampling is at chance and GRPO drifts to one
    label; at 150 steps greedy is already 1.0.)"""
    body = {
        "dataset_id": preference_dataset["id"],
        "suffix": "partly",
        "hyperparameters": {**TRAIN, "max_steps": PARTLY_RIGHT_SFT_STEPS},
        "evaluation": {"enabled": False},
    }
    return run_job(stack, body)


@pytest.fixture(scope="session")
def dpo_job(stack: Stack, preference_dataset: dict[str, Any], weak_sft: dict[str, Any]) -> dict[str, Any]:
    body = {
        "dataset_id": preference_dataset["id"],
        "objective": "dpo",
        "init_adapter": weak_sft["fine_tuned_model"],
        "suffix": "dpo",
        # beta 1: on this task the chosen and rejected answers differ in one token, and DPO's gradient is beta-scaled.
        "hyperparameters": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 80, "beta": 1.0, "seed": 0},
        "evaluation": EVAL,
    }
    return run_job(stack, body, evaluated=True)


def test_dataset_of_pairs_records_what_it_feeds(preference_dataset: dict[str, Any]) -> None:
    assert preference_dataset["format"] == "preference"
    assert preference_dataset["objectives"] == ["sft", "dpo", "orpo", "kto", "grpo"]
    assert preference_dataset["splits"] == {"train": 256, "test": 32}


@ONE_STACK
def test_dpo_from_a_weak_sft_adapter_raises_held_out_preference_accuracy(
    stack: Stack, dpo_job: dict[str, Any], weak_sft: dict[str, Any]
) -> None:
    assert dpo_job["objective"] == "dpo" and dpo_job["init_adapter"] == weak_sft["fine_tuned_model"]
    report = stack.client.get(f"/jobs/{dpo_job['id']}/report").json()
    metrics = {m["name"]: m for m in report["metrics"]}
    accuracy, margin = metrics["preference_accuracy"], metrics["mean_margin"]
    print(
        f"\n[{stack.kind}] DPO held-out preference accuracy {accuracy['base']:.3f} -> {accuracy['adapter']:.3f}, "
        f"mean margin {margin['base']:.3f} -> {margin['adapter']:.3f}; contains {metrics['contains']['base']:.3f} -> "
        f"{metrics['contains']['adapter']:.3f}"
    )
    assert accuracy["adapter"] > accuracy["base"] and accuracy["adapter"] >= 0.9, accuracy
    assert margin["adapter"] > margin["base"] and margin["improved"], margin
    # "Before" is the adapter DPO started from, evaluated on the same held-out pairs.
    base_eval = stack.client.get(f"/evaluations/{dpo_job['evaluation']['base_evaluation_id']}").json()
    assert base_eval["adapter"] == weak_sft["fine_tuned_model"]


@ONE_STACK
def test_dpo_events_carry_the_trainers_reward_metrics(stack: Stack, dpo_job: dict[str, Any]) -> None:
    events = metric_events(stack, dpo_job["id"])
    assert events, "no metrics events"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in (e["metrics"] or {}) for e in events), (key, events[0])
    last = events[-1]["metrics"]
    assert last["rewards/margins"] > 0 and last["rewards/accuracies"] > 0.5, last


@ONE_STACK
def test_dpo_adapter_records_its_parent_and_is_servable(
    stack: Stack, dpo_job: dict[str, Any], weak_sft: dict[str, Any]
) -> None:
    adapter = stack.client.get(f"/adapters/{dpo_job['fine_tuned_model']}").json()
    assert adapter["parent"] == weak_sft["fine_tuned_model"]
    assert adapter["method"] == "lora" and adapter["servable"] is True
    # Only the trained adapter: no copy of DPO's frozen "ref" adapter.
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter["files"])
    assert not any("ref" in name.split("/")[0] for name in adapter["files"]), adapter["files"]


@ONE_STACK
def test_grpo_with_a_string_check_grader_raises_the_held_out_grader_score(
    stack: Stack, preference_dataset: dict[str, Any], partly_right_sft: dict[str, Any]
) -> None:
    body = {
        "dataset_id": preference_dataset["id"],
        "objective": "grpo",
        "init_adapter": partly_right_sft["fine_tuned_model"],
        "grader": GRADER,
        "suffix": "grpo",
        # 8 prompts x 8 generations a step: enough prompts that one step's shift towards either label stays small, and
        # enough generations that most groups hold both answers. TRL's defaults otherwise (beta 0, group-scaled rewards).
        "hyperparameters": {
            "learning_rate": 1e-3,
            "batch_size": 64,
            "max_steps": 50,
            "num_generations": 8,
            "max_completion_length": 4,
            "temperature": 1.0,
            "seed": 0,
        },
        "evaluation": EVAL,
    }
    job = run_job(stack, body, evaluated=True)
    assert job["grader"]["type"] == "string_check" and job["init_adapter"] == partly_right_sft["fine_tuned_model"]
    report = stack.client.get(f"/jobs/{job['id']}/report").json()
    grader = next(m for m in report["metrics"] if m["name"] == "grader")
    events = metric_events(stack, job["id"])
    assert events and all("reward" in (e["metrics"] or {}) for e in events), events
    assert all("rewards/string_check/mean" in e["metrics"] for e in events), events[0]
    rewards = [e["metrics"]["reward"] for e in events]
    print(
        f"\n[{stack.kind}] GRPO held-out mean grader score {grader['base']:.3f} -> {grader['adapter']:.3f}; "
        f"mean training reward, first and last 5 logs: {sum(rewards[:5]) / 5:.3f} -> {sum(rewards[-5:]) / 5:.3f}"
    )
    # "Before" is the adapter GRPO started from, on the same 32 held-out prompts; after: at least one more right.
    base_eval = stack.client.get(f"/evaluations/{job['evaluation']['base_evaluation_id']}").json()
    assert base_eval["adapter"] == partly_right_sft["fine_tuned_model"]
    assert grader["adapter"] >= grader["base"] + 1 / 32 - 1e-9, grader
    samples = stack.client.get(f"/evaluations/{job['evaluation']['adapter_evaluation_id']}/samples").json()["data"]
    assert samples and all("grader" in s["scores"] for s in samples)


@pytest.mark.parametrize(
    ("objective", "method", "logged"),
    [("kto", "qlora", "kl"), ("orpo", "dora", "log_odds_ratio")],
)
def test_kto_and_orpo_train_an_adapter(
    stack: Stack, preference_dataset: dict[str, Any], objective: str, method: str, logged: str
) -> None:
    """Every objective trains on every LoRA parameterisation: here KTO on a 4-bit (QLoRA) base, ORPO with DoRA."""
    body = {
        "dataset_id": preference_dataset["id"],
        "objective": objective,
        "method": method,
        "suffix": objective,
        "hyperparameters": {**TRAIN, "max_steps": 4, "beta": 0.2},
        "evaluation": {"enabled": False},
    }
    job = run_job(stack, body)
    assert job["method"] == method
    events = metric_events(stack, job["id"])
    assert events and all(logged in (e["metrics"] or {}) for e in events), events
    adapter = stack.client.get(f"/adapters/{job['fine_tuned_model']}").json()
    assert adapter["status"] == "ready" and adapter["parent"] is None and adapter["method"] == method


def test_kto_trains_on_unpaired_rows(stack: Stack) -> None:
    rows = [
        {"prompt": f"Classify the sentiment: a {word} day", "completion": label, "label": good}
        for word, label, good in (
            ("good", "positive", True),
            ("bad", "negative", True),
            ("great", "negative", False),
            ("awful", "positive", False),
        )
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    dataset = stack.client.post("/datasets", files={"file": ("kto.jsonl", data)}).json()
    assert dataset["format"] == "unpaired" and dataset["objectives"] == ["kto"], dataset
    body = {
        "dataset_id": dataset["id"],
        "objective": "kto",
        "hyperparameters": {"max_steps": 2, "batch_size": 4, "desirable_weight": 1.5, "loss_type": "kto"},
        "evaluation": {"enabled": False},
    }
    job = run_job(stack, body)
    assert metric_events(stack, job["id"]), "no metrics events"


# --- what the API refuses (a 4xx naming the field; nothing is queued) ------------------------------------------------


def post_job(stack: Stack, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    response = stack.client.post("/jobs", json=body, headers=headers or {})
    return response.status_code, response.json().get("error") or {}


def test_an_objective_its_dataset_cannot_feed_is_a_422(
    stack: Stack, demo_dataset: dict[str, Any], preference_dataset: dict[str, Any]
) -> None:
    status, error = post_job(stack, {"dataset_id": demo_dataset["id"], "objective": "dpo"})
    assert (status, error["param"], error["code"]) == (422, "objective", "dataset_objective_mismatch"), error
    unpaired = (
        b'{"prompt": "hi", "completion": "hello", "label": true}\n{"prompt": "yo", "completion": "x", "label": false}\n'
    )
    response = stack.client.post("/datasets", files={"file": ("kto.jsonl", unpaired)})
    assert response.status_code == 201 and response.json()["objectives"] == ["kto"], response.text
    for objective in ("sft", "dpo", "orpo", "grpo"):
        grader = {"grader": GRADER} if objective == "grpo" else {}
        status, error = post_job(stack, {"dataset_id": response.json()["id"], "objective": objective, **grader})
        assert (status, error["param"]) == (422, "objective"), (objective, error)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"objective": "grpo"}, "grader"),
        ({"objective": "dpo", "grader": GRADER}, "grader"),
        (
            {"objective": "grpo", "grader": {"type": "string_check", "operation": "regex", "pattern": "(("}},
            "grader.pattern",
        ),
        ({"objective": "grpo", "grader": {"type": "json_schema", "schema": {"type": 3}}}, "grader.schema"),
        ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),
        ({"objective": "orpo", "hyperparameters": {"reference_model": "base"}}, "hyperparameters.reference_model"),
        ({"objective": "dpo", "hyperparameters": {"loss_type": "simpo"}}, "hyperparameters.loss_type"),
        ({"objective": "dpo", "method": "prefix_tuning"}, "method"),
        ({"objective": "rlhf"}, "objective"),
    ],
)
def test_bad_knobs_and_graders_are_a_422_naming_them(
    stack: Stack, preference_dataset: dict[str, Any], extra: dict[str, Any], param: str
) -> None:
    status, error = post_job(stack, {"dataset_id": preference_dataset["id"], **extra})
    assert (status, error["param"]) == (422, param), error


def test_a_bad_preference_upload_names_line_and_field(stack: Stack) -> None:
    rows = b'{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a", "rejected": "a"}\n'
    response = stack.client.post("/datasets", files={"file": ("pairs.jsonl", rows)})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "file:2:rejected"
    chat = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}\n'
    response = stack.client.post(
        "/datasets", files={"file": ("pairs.jsonl", rows.split(b"\n")[0]), "test_file": ("chat.jsonl", chat)}
    )
    assert response.status_code == 422 and response.json()["error"]["param"] == "test_file", response.text


def test_init_adapter_must_be_the_tenants_and_fit_the_job(
    stack: Stack, preference_dataset: dict[str, Any], weak_sft: dict[str, Any]
) -> None:
    from tests.support.stack import bearer, mint_api_key

    body = {"dataset_id": preference_dataset["id"], "objective": "dpo", "init_adapter": weak_sft["fine_tuned_model"]}
    status, error = post_job(stack, {**body, "init_adapter": "ft-nope-0"})
    assert (status, error["param"]) == (404, "init_adapter"), error
    for hp, param in (
        ({"lora_r": 16}, "hyperparameters.lora_r"),
        ({"lora_alpha": 4}, "hyperparameters.lora_alpha"),
        ({"target_modules": ["q_proj"]}, "hyperparameters.target_modules"),
    ):
        status, error = post_job(stack, {**body, "hyperparameters": hp})
        assert (status, error["param"]) == (422, param), error
    status, error = post_job(stack, {**body, "method": "dora"})
    assert (status, error["param"]) == (422, "method"), error
    # Another tenant cannot start from it (nor see it): a 404, as for any other tenant's resource.
    other = bearer(mint_api_key(stack.settings, f"other-{stack.kind}", new_tenant=True))
    other_dataset = stack.client.post(
        "/datasets", files={"file": ("p.jsonl", b'{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')}, headers=other
    ).json()["id"]
    status, error = post_job(stack, {**body, "dataset_id": other_dataset}, headers=other)
    assert (status, error["param"]) == (404, "init_adapter"), error
