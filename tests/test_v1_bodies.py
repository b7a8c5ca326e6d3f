"""/v1 bodies (issue 25, items 4 and 5): each tenant's requests carry its own cache_salt (a client's own is a 422;
/generate sets it too), a body passes through an allowlist of fields per endpoint (any other field, message key or
content-part key a 422 naming it), and a chat message's content is text only (a media part is a 422 naming it).
Through the API to real vLLM 0.32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.generation_schemas import CHAT_FIELDS, COMPLETION_FIELDS, ChatCompletionBody, CompletionBody, GenerateRequest
from api.routes.generation import _openai_body
from core.errors import InvalidInput
from core.serving_contract import tenant_cache_salt
from core.settings import Settings
from tests.support.stack import Stack


def test_identical_prompts_of_two_tenants_carry_different_cache_salts(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    body = CompletionBody.model_validate({"model": "m", "prompt": "the same prompt"})
    a = body.forwarded("m", cache_salt=tenant_cache_salt(settings, "tenant-a"))
    b = body.forwarded("m", cache_salt=tenant_cache_salt(settings, "tenant-b"))
    assert a["prompt"] == b["prompt"] and a["cache_salt"] != b["cache_salt"]
    assert a["cache_salt"] == tenant_cache_salt(settings, "tenant-a") and len(a["cache_salt"]) == 64
    with pytest.raises(InvalidInput) as info:
        CompletionBody.model_validate({"model": "m", "prompt": "x", "cache_salt": "b's"}).forwarded("m", cache_salt="s")
    assert info.value.param == "cache_salt"


def test_generate_carries_the_tenants_cache_salt() -> None:
    _, body = _openai_body(GenerateRequest(prompt="hi"), "m", cache_salt="salt-of-a")
    assert body["cache_salt"] == "salt-of-a" and body["prompt"] == "hi"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "prompt_embeds": "AAAA"}, "prompt_embeds"),
        ({"model": "m", "prompt": "x", "priority": -100}, "priority"),
        ({"model": "m", "prompt": "x", "kv_transfer_params": {}}, "kv_transfer_params"),
        ({"model": "m", "prompt": "x", "vllm_xargs": {"a": 1}}, "vllm_xargs"),
        ({"model": "m", "prompt": "x", "a_field_vllm_adds_next": 1}, "a_field_vllm_adds_next"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 7*7 }}"}, "chat_template"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "mm_processor_kwargs": {}},
            "mm_processor_kwargs",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x", "image": "http://x/"}]}, "messages.0.image"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "url": "u"}]}]},
            "messages.0.content.0.url",
        ),
        ({"model": "m", "prompt": "x", "messages": []}, "messages"),  # a chat field on completions
    ],
)
def test_fields_off_the_allowlist_are_refused_naming_them(body: dict[str, Any], param: str) -> None:
    kind = ChatCompletionBody if "messages" in body and "prompt" not in body else CompletionBody
    with pytest.raises(InvalidInput) as info:
        kind.model_validate(body).forwarded("m", cache_salt="s")
    assert info.value.param == param and info.value.code == "unsupported_field"


def test_what_lm_eval_and_the_openai_client_send_is_allowed() -> None:
    completion = {"model": "m", "prompt": "x", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    completion |= {"seed": 1, "stop": ["\n"], "return_token_ids": True, "stream": True, "n": 1, "top_p": 1.0}
    completion |= {"stream_options": {"include_usage": True}, "user": "u", "top_k": 2, "ignore_eos": True}
    assert CompletionBody.model_validate(completion).forwarded("m", cache_salt="s")["echo"] is True
    chat = {"model": "m", "messages": [{"role": "user", "content": "x", "name": "n"}], "logprobs": True}
    chat |= {"top_logprobs": 2, "max_completion_tokens": 3, "response_format": {"type": "json_object"}}
    assert ChatCompletionBody.model_validate(chat).forwarded("m", cache_salt="s")["top_logprobs"] == 2


def test_every_allowed_field_is_one_vllm_accepts() -> None:
    """The allowlists name only fields of vLLM's own request models (a rename in vLLM shows here)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    assert CHAT_FIELDS <= set(ChatCompletionRequest.model_fields)
    assert COMPLETION_FIELDS <= set(CompletionRequest.model_fields)


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "video_url", "file", None, ["text"], {"a": 1}])
def test_media_parts_are_refused_naming_the_part(kind: Any) -> None:
    part = {"type": kind, "image_url": {"url": "http://127.0.0.1:1/x.png"}}
    content = [{"type": "text", "text": "look"}, part]
    body = ChatCompletionBody.model_validate({"model": "m", "messages": [{"role": "user", "content": content}]})
    with pytest.raises(InvalidInput) as info:
        body.forwarded("m", cache_salt="s")
    assert info.value.param == "messages.0.content.1.type"


def test_vllm_accepts_the_salt_and_the_api_refuses_media_and_client_salts(serving_stack: Stack) -> None:
    model = serving_stack.settings.served_model_name
    ok = serving_stack.client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 2,
    }
    assert serving_stack.client.post("/v1/chat/completions", json=chat).status_code == 200
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}
    media = {**chat, "messages": [{"role": "user", "content": [image]}]}
    refused = serving_stack.client.post("/v1/chat/completions", json=media)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "messages.0.content.0.type"
    salted = serving_stack.client.post("/v1/completions", json={"model": model, "prompt": "hi", "cache_salt": "x"})
    assert salted.status_code == 422 and salted.json()["error"]["param"] == "cache_salt"
    # lm-eval's loglikelihood request (echo with logprobs, no new tokens) and vLLM's extensions pass the allowlist.
    scored = {"model": model, "prompt": "hi there", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    scored |= {"return_token_ids": True, "top_k": 1, "seed": 1}
    answer = serving_stack.client.post("/v1/completions", json=scored)
    assert answer.status_code == 200, answer.text
    usage, logprobs = answer.json()["usage"], answer.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == usage["total_tokens"]  # echoed: the prompt's tokens scored too
    unknown = serving_stack.client.post("/v1/completions", json={"model": model, "prompt": "hi", "prompt_embeds": "A"})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "prompt_embeds"
