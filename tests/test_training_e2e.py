"""End to end through a real Celery worker process and a real PEFT training child, on both stacks."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.chat import prompt_text, split_prompt_reference
from core.demo_data import demo_rows
from core.storage import sha256_file
from tests.support.stack import Stack

FAST = {"max_steps": 30, "learning_rate": 3e-3, "batch_size": 16, "lora_r": 8, "lora_alpha": 16, "seed": 1}


def _greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        outputs.append(out[0, ids["input_ids"].shape[1] :].tolist())
    return outputs


def test_job_trains_an_adapter_that_loads_and_changes_the_output(
    stack: Stack, demo_dataset: dict, model_dir: Path
) -> None:
    response = stack.client.post(
        "/jobs",
        json={
            "dataset_id": demo_dataset["id"],
            "hyperparameters": FAST,
            "suffix": "e2e",
            "evaluation": {"enabled": False},
        },
    )
    assert response.status_code == 201, response.text
    job = stack.wait_for_job(response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 30
    assert job["trained_tokens"] > 0 and job["last_loss"] is not None and job["attempts"] == 1

    events = stack.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    losses = [e["loss"] for e in events if e["loss"] is not None]
    assert len(losses) >= 10 and losses[-1] < losses[0]
    assert all(e["learning_rate"] is not None for e in events if e["type"] == "metrics")

    adapter = stack.client.get(f"/adapters/{job['fine_tuned_model']}").json()
    assert adapter["job_id"] == job["id"] and adapter["rank"] == 8 and adapter["status"] == "ready"
    assert set(adapter["target_modules"]) >= {"q_proj", "v_proj", "down_proj"}
    adapter_dir = stack.settings.store / "adapters" / adapter["name"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter["files"])
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in adapter_dir.iterdir())
    for name, digest in adapter["files"].items():
        assert sha256_file(adapter_dir / name) == digest
    assert not list((stack.settings.store / "tmp").iterdir()), "staging dirs must not be left behind"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_text(tokenizer, split_prompt_reference(r["messages"])[0]) for r in demo_rows(4, seed=99)]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = _greedy(base, tokenizer, prompts)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    after = _greedy(tuned, tokenizer, prompts)
    assert before != after


def test_cancel_a_running_job(stack: Stack, demo_dataset: dict) -> None:
    adapters_before = stack.client.get("/adapters", params={"limit": 100}).json()["data"]
    long_job = dict(FAST, max_steps=100_000)
    job_id = stack.client.post(
        "/jobs", json={"dataset_id": demo_dataset["id"], "hyperparameters": long_job, "evaluation": {"enabled": False}}
    ).json()["id"]
    running = stack.wait_for_job(job_id, condition=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    assert running["status"] == "running"
    assert stack.client.post(f"/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    job = stack.wait_for_job(job_id)
    assert job["status"] == "cancelled"
    assert job["fine_tuned_model"] is None
    assert stack.client.get("/adapters", params={"limit": 100}).json()["data"] == adapters_before
    messages = [e["message"] for e in stack.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]]
    assert "cancel requested" in messages and "job cancelled" in messages
