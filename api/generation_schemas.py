"""Request and response bodies of the generation routes: tuneserve's own `POST /generate`, and the few fields of
the OpenAI bodies the API itself checks before it forwards them to vLLM (which validates all the others)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.bounds import MAX_INT32, MAX_INT64, MIN_INT64
from core.errors import InvalidInput

# Schema bounds; the routes apply the deployment's settings (max_prompt_chars, max_prompts_per_request,
# max_messages_per_request, max_choices_per_request, serving_max_tokens) within them.
MAX_PROMPT_CHARS = 1_000_000
MAX_MESSAGES = 4096
MAX_PROMPTS = 128
MAX_STOP_CHARS = 1024
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: PromptText


class SamplingOptions(BaseModel):
    """Sampling knobs, named as in the OpenAI API (top_k as in vLLM's extension)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(
        None, ge=1, le=MAX_INT32, description="Default: as many as fit, up to TUNESERVE_SERVING_MAX_TOKENS"
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=MAX_INT32, description="None: no top-k cut")
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = Field(
        None, max_length=4, description="Stop strings (not included in the text)"
    )
    seed: int | None = Field(None, ge=MIN_INT64, le=MAX_INT64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


class GenerateRequest(SamplingOptions):
    """`POST /generate` body: a plain prompt, or chat messages rendered with the model's chat template."""

    prompt: PromptText | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerationOut(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    model: str
    adapter: str | None
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


class GenerationChunkOut(BaseModel):
    id: str
    object: Literal["generation.chunk"] = "generation.chunk"
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None = Field(None, description="On the last event only")


# The fields of vLLM's OpenAI request bodies (vLLM 0.32) that a tenant may send, per endpoint; anything else is a
# 422 naming it, so a field vLLM adds next reaches the engine only once it is listed here. Left out on purpose:
# cache_salt (the API sets it per tenant), priority (the API's), request_id, kv/ec_transfer_params, vllm_xargs,
# session_id and routed_experts_prompt_start (vLLM's internals), prompt_embeds (tensors vLLM deserializes),
# mm_payload, mm_processor_kwargs, media_io_kwargs, return_mm_kwargs (media), chat_template and documents (a
# template the engine would render), beam search and the rest of what this deployment does not document.
SAMPLING_FIELDS = frozenset(
    {
        "model", "stream", "stream_options", "n", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens",
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "logit_bias", "logprobs", "prompt_logprobs", "response_format", "structured_outputs", "user", "ignore_eos",
        "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "add_special_tokens",
        "return_token_ids", "return_tokens_as_token_ids", "truncate_prompt_tokens", "bad_words", "allowed_token_ids",
        "echo",
    }
)  # fmt: skip
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "suffix"}
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "include_reasoning", "reasoning_effort",
}  # fmt: skip
# The keys of one chat message vLLM reads (its ChatCompletionMessageParam); content parts are checked apart.
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "reasoning_content"})


def _refuse_unlisted(fields: Any, allowed: frozenset[str], *, at: str = "") -> None:
    for name in fields:
        if name not in allowed:
            param = f"{at}{name}"
            detail = (
                "it is set by the API for each tenant"
                if param == "cache_salt"
                else "not a field this API accepts (docs/serving.md)"
            )
            raise InvalidInput(f"{param[:100]}: {detail}", param=param[:200], code="unsupported_field")


class OpenAIBody(BaseModel):
    """The fields of an OpenAI request the API checks itself; the other fields of the endpoint's allowlist go to
    vLLM as sent (vLLM validates them), and any field off the list is a 422 naming it."""

    model_config = ConfigDict(extra="allow")
    allowed_fields: ClassVar[frozenset[str]] = SAMPLING_FIELDS

    model: str = Field(max_length=512, description="The base model's name, or the name of one of your adapters")
    stream: bool | None = None
    n: int | None = Field(None, ge=1, le=128, description="Choices; at most TUNESERVE_MAX_CHOICES_PER_REQUEST")
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32, description="At most TUNESERVE_SERVING_MAX_TOKENS")

    def check_fields(self) -> None:
        """Every field the client sent is on the endpoint's allowlist, or a 422 naming the first that is not. A
        client's own cache_salt is refused too: with it one tenant could share another's prefix cache."""
        _refuse_unlisted(self.model_extra or {}, self.allowed_fields)

    def forwarded(self, model: str, *, cache_salt: str) -> dict[str, Any]:
        """The body to send to serving: what the client sent (checked against the allowlist), with `model` as
        serving knows it and the tenant's `cache_salt` (core.serving_contract.tenant_cache_salt)."""
        self.check_fields()
        body = self.model_dump(exclude_unset=True)
        body["model"] = model
        body["cache_salt"] = cache_salt
        return body


class CompletionBody(OpenAIBody):
    allowed_fields: ClassVar[frozenset[str]] = COMPLETION_FIELDS

    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="A prompt, a list of prompts, or token ids (one list, or a list of lists)")


# Content parts a text model takes; media parts (image_url, input_audio, video_url, file...) make vLLM fetch URLs
# from the serving host for a multimodal base, so they are refused here on every base this API serves.
TEXT_PARTS = frozenset({"text"})
TEXT_PART_FIELDS = frozenset({"type", "text"})


class ChatCompletionBody(OpenAIBody):
    allowed_fields: ClassVar[frozenset[str]] = CHAT_FIELDS

    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)

    def check_fields(self) -> None:
        super().check_fields()
        for i, message in enumerate(self.messages):
            _refuse_unlisted(message, MESSAGE_FIELDS, at=f"messages.{i}.")
            content = message.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if not (isinstance(kind, str) and kind in TEXT_PARTS):  # a list or object is no type either
                    raise InvalidInput(
                        f"messages.{i}.content.{j}.type: {str(kind)[:50]!r} parts are not accepted; this model takes"
                        " text only",
                        param=f"messages.{i}.content.{j}.type",
                        code="unsupported_content",
                    )
                _refuse_unlisted(part, TEXT_PART_FIELDS, at=f"messages.{i}.content.{j}.")

    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_INT32, description="At most TUNESERVE_SERVING_MAX_TOKENS"
    )
