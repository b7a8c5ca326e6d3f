"""Every training method and knob as a job option, end to end through the real worker (SQLite stack).

The database backend does not change how a method trains, so these run on the embedded stack only;
tests/test_training_e2e.py covers both backends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.chat import prompt_text, split_prompt_reference
from core.demo_data import demo_rows
from tests.support.jobs import wait_until
from tests.support.stack import Stack

QUICK = {"max_steps": 6, "learning_rate": 3e-3, "batch_size": 8, "seed": 3}
NO_EVAL = {"enabled": False}  # the before/after evaluation has its own tests
sqlite_only = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def _prompts(tokenizer) -> list[str]:
    return [prompt_text(tokenizer, split_prompt_reference(r["messages"])[0]) for r in demo_rows(3, seed=5)]


def _next_token_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            rows.append(model(**ids).logits[0, -1])
    return torch.stack(rows)


def _run_job(stack: Stack, dataset_id: str, method: str, **hp: object) -> dict:
    response = stack.client.post(
        "/jobs",
        json={"dataset_id": dataset_id, "method": method, "evaluation": NO_EVAL, "hyperparameters": {**QUICK, **hp}},
    )
    assert response.status_code == 201, response.text
    job = stack.wait_for_job(response.json()["id"])
    assert job["status"] == "succeeded", job
    return job


@sqlite_only
@pytest.mark.parametrize(
    ("method", "hp", "servable"),
    [
        ("lora", {"use_rslora": True}, True),
        ("qlora", {"lora_r": 8}, True),
        ("dora", {"target_modules": "attention"}, False),
        ("prompt_tuning", {"num_virtual_tokens": 8, "learning_rate": 3e-2}, False),
        ("p_tuning", {"num_virtual_tokens": 8, "learning_rate": 3e-2}, False),
        ("prefix_tuning", {"num_virtual_tokens": 8, "learning_rate": 3e-2}, False),
        ("full", {"learning_rate": 1e-3}, False),
    ],
)
def test_each_method_trains_a_loadable_adapter_that_changes_the_output(
    stack: Stack, demo_dataset: dict, model_dir: Path, method: str, hp: dict, servable: bool
) -> None:
    job = _run_job(stack, demo_dataset["id"], method, **hp)
    adapter = stack.client.get(f"/adapters/{job['fine_tuned_model']}").json()
    assert adapter["method"] == method and adapter["servable"] is servable
    assert servable or adapter["servable_reason"]
    adapter_dir = stack.settings.store / "adapters" / adapter["name"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = _next_token_logits(base, tokenizer, _prompts(tokenizer))
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).eval()
    else:
        tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    after = _next_token_logits(tuned, tokenizer, _prompts(tokenizer))
    assert not torch.allclose(before, after, atol=1e-4)


@sqlite_only
def test_gradient_accumulation_matches_a_bigger_batch(stack: Stack, demo_dataset: dict) -> None:
    """4 x batch 2 and 1 x batch 8 see the same examples per step: the first losses agree."""
    common = {"max_steps": 2, "learning_rate": 1e-3, "lora_dropout": 0.0, "seed": 11}
    big = _run_job(stack, demo_dataset["id"], "lora", batch_size=8, gradient_accumulation_steps=1, **common)
    accumulated = _run_job(stack, demo_dataset["id"], "lora", batch_size=2, gradient_accumulation_steps=4, **common)

    def first_loss(job: dict) -> float:
        events = stack.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        return next(e["loss"] for e in events if e["type"] == "metrics")

    assert first_loss(accumulated) == pytest.approx(first_loss(big), rel=0.02)


@sqlite_only
@pytest.mark.parametrize(
    "hp",
    [
        {"packing": True},
        {"gradient_checkpointing": True},
        {"precision": "bf16"},
        {"optimizer": "adafactor", "lr_scheduler_type": "cosine", "warmup_ratio": 0.2, "weight_decay": 0.01},
        {"completion_only_loss": False, "max_seq_length": 16},
    ],
)
def test_knobs_train_to_completion(stack: Stack, demo_dataset: dict, hp: dict) -> None:
    job = _run_job(stack, demo_dataset["id"], "lora", **hp)
    events = [
        e["message"] for e in stack.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    ]
    if hp.get("max_seq_length") == 16:
        assert any(m.endswith("truncated to 16 tokens") and " 0 truncated" not in m for m in events)


@sqlite_only
@pytest.mark.parametrize(
    ("method", "hp", "param"),
    [
        ("lora", {"precision": "fp16"}, "hyperparameters.precision"),
        ("lora", {"optimizer": "adamw_8bit"}, "hyperparameters.optimizer"),
        ("lora", {"target_modules": ["q_proj", "w_nowhere"]}, "hyperparameters.target_modules"),
        ("prompt_tuning", {"packing": True}, "hyperparameters.packing"),
        ("lora", {"distributed": {"strategy": "deepspeed", "zero_stage": 3}}, "hyperparameters.distributed.strategy"),
        (
            "lora",
            {"distributed": {"strategy": "ddp", "num_processes": 64}},
            "hyperparameters.distributed.num_processes",
        ),
        ("lora", {"keep_checkpoints": 1}, "hyperparameters.keep_checkpoints"),
    ],
)
def test_knobs_the_deployment_cannot_run_are_422(
    stack: Stack, demo_dataset: dict, method: str, hp: dict, param: str
) -> None:
    response = stack.client.post(
        "/jobs", json={"dataset_id": demo_dataset["id"], "method": method, "hyperparameters": hp}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def _training_child_pid(job_id: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"worker.training {job_id}"], capture_output=True, text=True).stdout.split()
    assert out, "training child not found"
    return int(out[0])


@sqlite_only
def test_killed_child_resumes_from_its_checkpoint(stack: Stack, demo_dataset: dict) -> None:
    hp = {**QUICK, "max_steps": 40, "checkpoint_every_steps": 10, "keep_checkpoints": 2}
    body = {"dataset_id": demo_dataset["id"], "hyperparameters": hp, "evaluation": NO_EVAL}
    job_id = stack.client.post("/jobs", json=body).json()["id"]
    stack.wait_for_job(job_id, condition=lambda j: j["progress"]["step"] >= 22)
    checkpoints = stack.client.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert any(c["step"] == 20 and c["complete"] for c in checkpoints)
    os.kill(_training_child_pid(job_id), signal.SIGKILL)

    job = stack.wait_for_job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 40
    events = stack.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    resumed = [e for e in events if e["message"].startswith("resuming from checkpoint")]
    assert len(resumed) == 1 and resumed[0]["step"] >= 20 and resumed[0]["attempt"] == 2
    second_attempt_steps = [e["step"] for e in events if e["type"] == "metrics" and e["attempt"] == 2]
    assert second_attempt_steps and min(second_attempt_steps) > 20
    adapters = [a for a in stack.client.get("/adapters", params={"limit": 100}).json()["data"] if a["job_id"] == job_id]
    assert len(adapters) == 1
    # Checkpoints are freed once the job ended (no retry can need them), by its worker right after the child exits.
    deadline = time.monotonic() + 30
    while stack.client.get(f"/jobs/{job_id}/checkpoints").json()["data"] and time.monotonic() < deadline:
        time.sleep(0.25)
    assert stack.client.get(f"/jobs/{job_id}/checkpoints").json()["data"] == []


def _rank_pids(job_id: str) -> list[int]:
    """The DDP ranks of a job: its `worker.ddp_rank` processes other than torchrun itself."""
    out = subprocess.run(["pgrep", "-af", f"worker.ddp_rank {job_id}"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "torch.distributed.run" not in line]


@sqlite_only
def test_a_ddp_job_stopped_at_its_time_limit_leaves_no_rank_running(stack: Stack, demo_dataset: dict) -> None:
    """The supervisor stops torchrun's process group; torchrun starts each rank in a session of its own, so the
    ranks must die with torchrun (PR_SET_PDEATHSIG), not train on as orphans. Whether the limit finds them training
    or still importing torch does not matter: a rank asks for its death signal on its first line (worker/ddp_rank.py)."""
    hp = {
        **QUICK,
        "max_steps": 100_000,
        "time_limit_seconds": 25,
        "distributed": {"strategy": "ddp", "num_processes": 2},
    }
    body = {"dataset_id": demo_dataset["id"], "hyperparameters": hp, "evaluation": NO_EVAL}
    job_id = stack.client.post("/jobs", json=body).json()["id"]
    wait_until(lambda: len(_rank_pids(job_id)) == 2, timeout=25, what="torchrun to start both ranks")
    job = stack.wait_for_job(job_id, timeout=90)
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit", job
    wait_until(lambda: not _rank_pids(job_id), timeout=15, what="the DDP ranks to die with torchrun")


@sqlite_only
def test_ddp_with_two_processes_trains_one_adapter(stack: Stack, demo_dataset: dict) -> None:
    job = _run_job(stack, demo_dataset["id"], "lora", max_steps=4, distributed={"strategy": "ddp", "num_processes": 2})
    adapters = [
        a for a in stack.client.get("/adapters", params={"limit": 100}).json()["data"] if a["job_id"] == job["id"]
    ]
    assert len(adapters) == 1
    events = [
        e["message"] for e in stack.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    ]
    assert sum(m.startswith("job succeeded") for m in events) == 1
