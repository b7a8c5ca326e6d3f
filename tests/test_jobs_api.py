"""POST /jobs validation (422/404 naming the param), listing, events and cancel of a queued job."""

from __future__ import annotations

import pytest

from tests.support.stack import Stack


@pytest.mark.parametrize(
    ("hyperparameters", "param", "phrase"),
    [
        ({"lora_r": 7}, "hyperparameters.lora_r", "vLLM"),
        ({"lora_r": 128}, "hyperparameters.lora_r", "one of"),
        ({"learning_rate": -1}, "hyperparameters.learning_rate", "greater than 0"),
        ({"batch_size": 0}, "hyperparameters.batch_size", "greater than or equal to 1"),
        ({"max_seq_length": 1_000_000}, "hyperparameters.max_seq_length", "at most"),
        ({"lora_dropout": 1.5}, "hyperparameters.lora_dropout", "less than 1"),
        ({"warp_speed": 9}, "hyperparameters.warp_speed", "Extra inputs"),
        ({"target_modules": []}, "hyperparameters.target_modules", "empty"),
        ({"target_modules": "everything"}, "hyperparameters.target_modules", ""),
        ({"n_epochs": 0}, "hyperparameters.n_epochs", "greater than 0"),
    ],
)
def test_bad_hyperparameters_are_422_naming_the_param(
    stack: Stack, demo_dataset: dict, hyperparameters: dict, param: str, phrase: str
) -> None:
    before = stack.client.get("/jobs", params={"limit": 100}).json()["data"]
    response = stack.client.post("/jobs", json={"dataset_id": demo_dataset["id"], "hyperparameters": hyperparameters})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param), error
    assert phrase in error["message"]
    assert stack.client.get("/jobs", params={"limit": 100}).json()["data"] == before


def test_unknown_dataset_is_404_naming_dataset_id(stack: Stack) -> None:
    response = stack.client.post("/jobs", json={"dataset_id": "ds-missing"})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "dataset_id"


def test_other_base_model_is_refused(stack: Stack, demo_dataset: dict) -> None:
    response = stack.client.post("/jobs", json={"dataset_id": demo_dataset["id"], "base_model": "gpt-5"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "base_model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "dataset_id"),
        ({"dataset_id": "x", "method": "magic"}, "method"),
        ({"dataset_id": "x", "suffix": "no spaces"}, "suffix"),
    ],
)
def test_malformed_job_bodies(stack: Stack, body: dict, param: str) -> None:
    response = stack.client.post("/jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


def test_unknown_job_ids_are_404(stack: Stack) -> None:
    for method, path in [
        ("get", "/jobs/ftjob-nope"),
        ("get", "/jobs/ftjob-nope/events"),
        ("post", "/jobs/ftjob-nope/cancel"),
    ]:
        response = getattr(stack.client, method)(path)
        assert response.status_code == 404
        assert response.json()["error"]["param"] == "job_id"


def test_unknown_adapter_is_404(stack: Stack) -> None:
    response = stack.client.get("/adapters/ft-nope")
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "name"


def test_bad_query_parameters_name_the_field(stack: Stack) -> None:
    assert stack.client.get("/jobs", params={"status": "dancing"}).json()["error"]["param"] == "status"
    assert stack.client.get("/jobs", params={"limit": 0}).json()["error"]["param"] == "limit"
    assert stack.client.get("/nowhere").status_code == 404
    assert "error" in stack.client.get("/nowhere").json()


def test_job_defaults_listing_and_filter(stack: Stack, demo_dataset: dict) -> None:
    # Stop the worker so the jobs stay queued while we look at them.
    stack.stop_worker()
    try:
        created = [
            stack.client.post("/jobs", json={"dataset_id": demo_dataset["id"], "suffix": f"list{i}"}).json()
            for i in range(3)
        ]
        job = created[0]
        assert job["status"] == "queued"
        assert job["hyperparameters"]["lora_r"] == 8 and job["hyperparameters"]["n_epochs"] == 3
        assert job["base_model"] == stack.settings.served_model_name
        page = stack.client.get("/jobs", params={"limit": 2, "status": "queued"}).json()
        assert page["has_more"] is True and all(j["status"] == "queued" for j in page["data"])
        events = stack.client.get(f"/jobs/{job['id']}/events").json()["data"]
        assert [e["message"] for e in events] == ["job queued"]

        for j in created:
            cancelled = stack.client.post(f"/jobs/{j['id']}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        again = stack.client.post(f"/jobs/{job['id']}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    finally:
        stack.start_worker()
    # The worker now receives the three messages and must turn every one away: the jobs are cancelled.
    for j in created:
        assert stack.wait_for_job(j["id"])["status"] == "cancelled"
        assert stack.client.get(f"/jobs/{j['id']}").json()["attempts"] == 0
