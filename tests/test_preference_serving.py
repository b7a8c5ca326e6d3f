"""A preference-trained adapter is served like any other: through /generate and /v1, equal to transformers + PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.demo_data import write_demo_preference_dataset
from core.storage import Store
from tests.support.generation import MAX_NEW, Reference, generate
from tests.support.stack import Stack

REQUEST = {
    "messages": [
        {"role": "system", "content": "Answer positive or negative."},
        {"role": "user", "content": "Classify the sentiment: a great day"},
    ]
}


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


def test_a_dpo_adapter_is_served_through_generate_and_v1(
    serving_stack: Stack, reference: Reference, tmp_path: Path
) -> None:
    stack = serving_stack
    train, _ = write_demo_preference_dataset(tmp_path, n_train=64, n_test=8, seed=1)
    with train.open("rb") as f:
        dataset = stack.client.post("/datasets", files={"file": ("pairs.jsonl", f)})
    assert dataset.status_code == 201, dataset.text
    body = {
        "dataset_id": dataset.json()["id"],
        "objective": "dpo",
        "hyperparameters": {"max_steps": 4, "learning_rate": 1e-2, "batch_size": 8, "beta": 1.0, "use_rslora": True},
        "evaluation": {"enabled": False},
    }
    stack.start_worker()
    try:
        job = stack.client.post("/jobs", json=body)
        assert job.status_code == 201, job.text
        done = stack.wait_for_job(job.json()["id"])
    finally:
        stack.stop_worker()
    assert done["status"] == "succeeded", done
    name = done["fine_tuned_model"]
    adapter_dir = Store(stack.settings).resolve(Store(stack.settings).adapter_dir(name))
    expected = reference.greedy(adapter_dir, REQUEST)
    assert expected != reference.greedy(None, REQUEST), "the adapter must change the output, or equality proves nothing"

    response = generate(stack, REQUEST, adapter=name)
    assert response.status_code == 200, response.text
    assert response.json()["adapter"] == name and response.json()["token_ids"] == expected

    assert name in [m["id"] for m in stack.client.get("/v1/models").json()["data"]]
    chat = stack.client.post(
        "/v1/chat/completions", json={"model": name, **REQUEST, "max_tokens": MAX_NEW, "temperature": 0}
    )
    assert chat.status_code == 200, chat.text
    text = str(reference.tokenizer.decode(expected, skip_special_tokens=True))
    assert chat.json()["choices"][0]["message"]["content"].strip() == text.strip()
