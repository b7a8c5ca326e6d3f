"""/v1 bodies (issue 25, item 4): each tenant's requests carry its own cache_salt (a client's own is a 422), and a
chat message's content is text only (a media part is a 422 naming it). Through the API to real vLLM 0.32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.generation_schemas import ChatCompletionBody, CompletionBody
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
