"""Serving against the real vLLM engine on the tiny model: one `python -m serving` for the whole session.

References are transformers + PEFT greedy generations with the same adapter files; vLLM must match them
token for token (docs/environment.md: this holds on the tiny fp32 model).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.storage import Store
from tests.support.aio import run_async
from tests.support.generation import MAX_NEW, PROMPTS, Reference, generate, make_adapter, unique
from tests.support.http import Response, api_server, assert_error
from tests.support.processes import free_port
from tests.support.stack import Stack, bearer

# --- references: transformers + PEFT --------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


# --- adapters made in a blink ----------------------------------------------------------------------


def edit_config(**changes: Any) -> Any:
    def edit(directory: Path) -> None:
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return edit


def wrong_shapes(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.randn(8, 17)
    save_file(tensors, path)


# --- the API as a real server (for the openai client and truly concurrent traffic) -------------------


@pytest.fixture(scope="module")
def api_url(serving_stack: Stack) -> Iterator[str]:
    with api_server(serving_stack.settings) as url:
        yield url


# --- tests -----------------------------------------------------------------------------------------


def test_greedy_outputs_equal_transformers_and_peft(serving_stack: Stack, reference: Reference) -> None:
    names = [unique("ref"), unique("ref")]
    dirs = {name: make_adapter(serving_stack, reference, name, seed=i) for i, name in enumerate(names)}
    seen = set()
    for request in PROMPTS:
        response = generate(serving_stack, request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == serving_stack.settings.served_model_name and body["adapter"] is None
        assert body["token_ids"] == reference.greedy(None, request)
        assert body["usage"]["prompt_tokens"] == len(reference.prompt_ids(request))
        seen.add(tuple(body["token_ids"]))
        for name, directory in dirs.items():
            body = generate(serving_stack, request, adapter=name).json()
            assert body["adapter"] == name and body["model"] == name
            assert body["token_ids"] == reference.greedy(directory, request), (name, request)
            seen.add(tuple(body["token_ids"]))
    assert len(seen) > len(PROMPTS), "adapters must change the output, or equality proves nothing"


def test_many_adapters_concurrently_each_equals_its_reference(
    serving_stack: Stack, reference: Reference, api_url: str
) -> None:
    settings = serving_stack.settings
    n = 12
    assert n > settings.serving_max_cpu_loras
    names = [unique("many") for _ in range(n)]
    dirs = {name: make_adapter(serving_stack, reference, name, seed=100 + i) for i, name in enumerate(names)}
    jobs = [(name, request) for request in PROMPTS[:2] for name in names] + [(None, r) for r in PROMPTS[:2]]

    async def run_all() -> list[Response]:
        async with httpx.AsyncClient(base_url=api_url, timeout=120, headers=bearer(serving_stack.api_key)) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/generate",
                        params={"adapter": name} if name else {},
                        json={**request, "temperature": 0, "max_tokens": MAX_NEW},
                    )
                    for name, request in jobs
                )
            )

    responses = run_async(run_all())
    for (name, request), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["token_ids"] == reference.greedy(dirs.get(name) if name else None, request), name
    # Concurrent first requests for a name resolve and load it once (vLLM's lock per name); LRU reloads are vLLM's.
    log = serving_stack.extra["serving"].log.read_text()
    for name in names:
        assert log.count(f"Resolved and loaded LoRA adapter '{name}'") == 1, name


def test_job_adapter_is_served_right_after_the_job_succeeds(
    serving_stack: Stack, reference: Reference, demo_files: tuple[Path, Path]
) -> None:
    stack = serving_stack
    train, _ = demo_files
    with train.open("rb") as f:
        dataset = stack.client.post("/datasets", files={"file": ("train.jsonl", f)})
    assert dataset.status_code == 201, dataset.text
    hyperparameters = {"max_steps": 6, "learning_rate": 3e-3, "batch_size": 8, "lora_r": 8, "lora_alpha": 16}
    stack.start_worker()
    job = stack.client.post("/jobs", json={"dataset_id": dataset.json()["id"], "hyperparameters": hyperparameters})
    assert job.status_code == 201, job.text
    done = stack.wait_for_job(job.json()["id"])
    stack.stop_worker()
    assert done["status"] == "succeeded", done
    name = done["fine_tuned_model"]
    assert name in [m["id"] for m in stack.client.get("/v1/models").json()["data"]]
    response = generate(stack, PROMPTS[1], adapter=name)
    assert response.status_code == 200, response.text
    adapter_dir = Store(stack.settings).resolve(Store(stack.settings).adapter_dir(name))
    assert response.json()["token_ids"] == reference.greedy(adapter_dir, PROMPTS[1])


BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "dora": ({"edit": edit_config(use_dora=True)}, "DoRA"),
    "modules-to-save": ({"edit": edit_config(modules_to_save=["lm_head"])}, "modules_to_save"),
    "lm-head": ({"edit": edit_config(target_modules=["q_proj", "lm_head"])}, "lm_head"),
    "prefix": ({"edit": edit_config(peft_type="PREFIX_TUNING")}, "peft_type"),
    "rank-too-high": ({"rank": 16}, "max_lora_rank"),
    "wrong-shapes": ({"edit": wrong_shapes}, "does not fit"),
    "engine-refuses": ({"edit": edit_config(bias="all")}, "could not be loaded"),
}


def test_broken_adapters_fail_alone_while_others_keep_answering(
    serving_stack: Stack, reference: Reference, api_url: str
) -> None:
    good = unique("good")
    good_dir = make_adapter(serving_stack, reference, good, seed=7)
    names: dict[str, str] = {}  # adapter -> what its refusal must say
    for i, (kind, (kwargs, reason)) in enumerate(BROKEN.items()):
        name = unique(f"bad-{kind}")
        make_adapter(serving_stack, reference, name, seed=200 + i, **kwargs)
        names[name] = reason
    # Tampered after registration: the recorded sha256 no longer matches the file.
    tampered = unique("tampered")
    tampered_dir = make_adapter(serving_stack, reference, tampered, seed=300)
    with (tampered_dir / "adapter_model.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")

    names[tampered] = "sha256"
    request = PROMPTS[1]

    async def run_all() -> list[Response]:
        async with httpx.AsyncClient(base_url=api_url, timeout=120, headers=bearer(serving_stack.api_key)) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/generate", params={"adapter": name}, json={**request, "temperature": 0, "max_tokens": MAX_NEW}
                    )
                    for name in [*names, good, good, good]
                )
            )

    responses = run_async(run_all())
    for name, response in zip(list(names) + [good] * 3, responses, strict=True):
        if name == good:
            assert response.status_code == 200, response.text
            assert response.json()["token_ids"] == reference.greedy(good_dir, request)
        else:
            error = assert_error(response, 422, "adapter", "adapter_not_servable")
            assert names[name] in error["message"], (name, error)
    # Refused again, and the good one and the base still answer.
    again = generate(serving_stack, request, adapter=next(iter(names)))
    assert again.status_code == 422
    openai_style = serving_stack.client.post("/v1/completions", json={"model": tampered, "prompt": "hi"})
    assert "sha256" in assert_error(openai_style, 422, "model", "adapter_not_servable")["message"]
    assert generate(serving_stack, request, adapter=good).json()["token_ids"] == reference.greedy(good_dir, request)
    assert generate(serving_stack, request).json()["token_ids"] == reference.greedy(None, request)


def _events(response: Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_sse_matches_the_plain_answer(serving_stack: Stack, reference: Reference) -> None:
    name = unique("stream")
    directory = make_adapter(serving_stack, reference, name, seed=11)
    request = PROMPTS[2]
    body = {**request, "temperature": 0, "max_tokens": MAX_NEW, "stream": True}
    with serving_stack.client.stream("POST", "/generate", params={"adapter": name}, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = events[:-1]
    assert [t for c in chunks for t in c["token_ids"]] == reference.greedy(directory, request)
    plain = generate(serving_stack, request, adapter=name).json()
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["finish_reason"] == plain["finish_reason"] and chunks[-1]["usage"] == plain["usage"]
    assert all(c["finish_reason"] is None and c["usage"] is None for c in chunks[:-1])
    # A bad adapter in a streamed request is a plain 404/422, not an error inside a 200 stream.
    assert_error(generate(serving_stack, request, adapter="no-such-adapter", stream=True), 404, "adapter")


def test_openai_client_models_completions_chat_and_streaming(
    serving_stack: Stack, reference: Reference, api_url: str
) -> None:
    name = unique("oai")
    directory = make_adapter(serving_stack, reference, name, seed=21)
    base = serving_stack.settings.served_model_name
    client = openai.OpenAI(base_url=f"{api_url}/v1", api_key=serving_stack.api_key, max_retries=0)

    models = [m.id for m in client.models.list().data]
    assert models[0] == base and name in models

    # Texts are compared with /generate's (vLLM detokenizes incrementally and holds back a trailing
    # partial UTF-8 character where tokenizer.decode would write U+FFFD); its token ids with PEFT's.
    messages = PROMPTS[1]["messages"]
    expected = reference.greedy(directory, {"messages": messages})
    plain = generate(serving_stack, {"messages": messages}, adapter=name).json()
    assert plain["token_ids"] == expected
    chat = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=MAX_NEW)
    assert chat.object == "chat.completion" and chat.model == name
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain["text"]
    assert chat.usage is not None and chat.usage.completion_tokens == len(expected)

    stream = client.chat.completions.create(
        model=name,
        messages=messages,
        temperature=0,
        max_tokens=MAX_NEW,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(expected)

    prompt = PROMPTS[0]["prompt"]
    plain = generate(serving_stack, {"prompt": prompt}).json()
    assert plain["token_ids"] == reference.greedy(None, {"prompt": prompt})
    completion = client.completions.create(model=base, prompt=prompt, temperature=0, max_tokens=MAX_NEW)
    assert completion.choices[0].text == plain["text"]
    assert completion.usage is not None and completion.usage.completion_tokens == len(plain["token_ids"])
    streamed = client.completions.create(model=base, prompt=prompt, temperature=0, max_tokens=MAX_NEW, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    assert not_found.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=base, prompt=prompt, max_tokens=10_000)


def test_limits_and_bad_input_name_the_field(serving_stack: Stack) -> None:
    settings = serving_stack.settings
    assert_error(generate(serving_stack, PROMPTS[0], max_tokens=settings.serving_max_tokens + 1), 422, "max_tokens")
    # Longer than the context: vLLM's own check (it alone has the tokenizer), its message in the one error shape.
    long_prompt = {"prompt": " ".join(["word"] * (settings.serving_max_model_len + 10))}
    assert "context length" in assert_error(generate(serving_stack, long_prompt), 400, "prompt")["message"]
    long_chat = {"messages": [{"role": "user", "content": long_prompt["prompt"]}]}
    assert "context length" in assert_error(generate(serving_stack, long_chat), 400, "messages")["message"]
    too_long = {"prompt": "x" * (settings.max_prompt_chars + 1)}
    assert_error(generate(serving_stack, too_long), 422, "prompt")
    assert_error(generate(serving_stack, PROMPTS[0], frobnicate=1), 422, "frobnicate")
    assert_error(generate(serving_stack, {**PROMPTS[0], **PROMPTS[1]}), 422, "prompt")
    assert_error(generate(serving_stack, {}), 422, "prompt")
    assert_error(generate(serving_stack, PROMPTS[0], temperature=5), 422, "temperature")
    assert_error(generate(serving_stack, PROMPTS[0], adapter="no-such-adapter"), 404, "adapter")
    chat = serving_stack.client.post("/v1/chat/completions", json={"model": "nope", "messages": PROMPTS[1]["messages"]})
    assert_error(chat, 404, "model")
    base, messages = settings.served_model_name, PROMPTS[1]["messages"]
    many = serving_stack.client.post("/v1/chat/completions", json={"model": base, "messages": messages, "n": 99})
    assert_error(many, 422, "n", "too_many_choices")
    internal = {"model": base, "messages": messages, "kv_transfer_params": {}}
    assert_error(serving_stack.client.post("/v1/chat/completions", json=internal), 422, "kv_transfer_params")
    bad_knob = serving_stack.client.post("/v1/chat/completions", json={"model": base, "messages": messages, "top_p": 7})
    assert bad_knob.status_code == 400 and "top_p" in bad_knob.json()["error"]["message"]  # vLLM's own check


def test_deleted_adapter_is_unloaded_and_never_served_again(serving_stack: Stack, reference: Reference) -> None:
    name = unique("del")
    make_adapter(serving_stack, reference, name, seed=31)
    assert generate(serving_stack, PROMPTS[0], adapter=name).status_code == 200
    serving = serving_stack.extra["serving"]
    assert name in serving.loaded_adapters()

    deleted = serving_stack.client.delete(f"/adapters/{name}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert name not in serving.loaded_adapters()
    assert_error(generate(serving_stack, PROMPTS[0], adapter=name), 404, "adapter")
    assert name not in [m["id"] for m in serving_stack.client.get("/v1/models").json()["data"]]
    assert_error(serving_stack.client.delete(f"/adapters/{name}"), 404, "name")
    # Serving itself refuses the name from now on: its resolver reads SQL again, and the row says deleted.
    headers = {"X-Tuneserve-Serving-Token": serving.token}
    direct = httpx.post(f"{serving.url}/v1/completions", headers=headers, json={"model": name, "prompt": "hi"})
    assert direct.status_code == 404


def test_serving_is_internal_and_token_protected(serving_stack: Stack) -> None:
    serving = serving_stack.extra["serving"]
    assert serving.url.startswith("http://127.0.0.1:")
    body = {"model": serving_stack.settings.served_model_name, "prompt": "hi", "max_tokens": 1}
    for path in ("/v1/completions", "/metrics", "/v1/models", "/health"):
        assert_error(httpx.post(f"{serving.url}{path}", json=body), 401, None, "invalid_serving_token")
    # Loading by path is refused even with the token: adapters come from the registry, verified.
    headers = {"X-Tuneserve-Serving-Token": serving.token}
    for path in ("/v1/load_lora_adapter", "/adapters"):
        load = httpx.post(f"{serving.url}{path}", headers=headers, json={"lora_name": "x", "lora_path": "/tmp"})
        assert_error(load, 404, None, "not_found")


def test_serving_down_is_503_with_retry_after(serving_stack: Stack) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from core.settings import Settings

    down = Settings(
        **{
            **serving_stack.settings.model_dump(),
            "serving_url": f"http://127.0.0.1:{free_port()}",
            "reconcile_interval_seconds": 0,
        }
    )
    with TestClient(create_app(down), headers=bearer(serving_stack.api_key)) as client:
        for response in (
            client.post("/generate", json={"prompt": "hi"}),
            client.post("/generate", json={"prompt": "hi", "stream": True}),
            client.post("/v1/completions", json={"model": down.served_model_name, "prompt": "hi"}),
        ):
            assert_error(response, 503, None, "unavailable")
            assert int(response.headers["Retry-After"]) >= 1


def _serving_metric(serving_stack: Stack, line_prefix: str) -> float:
    return float(serving_stack.extra["serving"].metric(line_prefix))


def test_serving_metrics_are_vllms_plus_the_resolvers(serving_stack: Stack, reference: Reference) -> None:
    """One scrape of a replica: vLLM's own metrics (tokens, per-LoRA requests) and the resolver's refusals."""
    before_tokens = _serving_metric(serving_stack, "vllm:generation_tokens_total")
    before_verified = _serving_metric(serving_stack, 'tuneserve_serving_adapter_resolutions_total{outcome="verified"}')
    before_sha = _serving_metric(serving_stack, "tuneserve_serving_sha256_refusals_total")
    name, tampered = unique("metrics"), unique("metrics-bad")
    make_adapter(serving_stack, reference, name, seed=21)
    tampered_dir = make_adapter(serving_stack, reference, tampered, seed=22)
    (tampered_dir / "adapter_config.json").write_text((tampered_dir / "adapter_config.json").read_text() + " ")
    plain = generate(serving_stack, PROMPTS[0], adapter=name)
    assert plain.status_code == 200
    streamed = generate(serving_stack, PROMPTS[0], adapter=name, stream=True)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert_error(generate(serving_stack, PROMPTS[0], adapter=tampered), 422, "adapter", "adapter_not_servable")
    expected = before_tokens + 2 * plain.json()["usage"]["completion_tokens"]
    assert _serving_metric(serving_stack, "vllm:generation_tokens_total") == expected
    verified = 'tuneserve_serving_adapter_resolutions_total{outcome="verified"}'
    assert _serving_metric(serving_stack, verified) == before_verified + 1
    assert _serving_metric(serving_stack, "tuneserve_serving_sha256_refusals_total") == before_sha + 1
    assert _serving_metric(serving_stack, 'tuneserve_serving_adapter_load_failures_total{reason="sha256"}') >= 1
    assert _serving_metric(serving_stack, "vllm:lora_requests_info") >= 1


def test_cpu_lora_plugin_and_registry_resolver_are_active_in_vllms_server(
    serving_stack: Stack, reference: Reference
) -> None:
    """Both tuneserve plugins load in vLLM's own server: the CPU LoRA ops in the engine process that runs the
    model, the resolver in the API-server process that resolves names."""
    name = unique("plugins")
    make_adapter(serving_stack, reference, name, seed=71)
    assert generate(serving_stack, PROMPTS[0], adapter=name).status_code == 200
    log = serving_stack.extra["serving"].log.read_text()
    active = [line for line in log.splitlines() if "tuneserve CPU LoRA: stacked multi-LoRA ops active" in line]
    assert any("(EngineCore" in line or "(VllmWorker" in line for line in active), active
    assert f"Resolved and loaded LoRA adapter '{name}' using TuneserveResolver" in log
