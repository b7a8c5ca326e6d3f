"""Request and response bodies of the generation routes: tuneserve's own `POST /generate`, and the few fields of
the OpenAI bodies the API itself checks before it forwards them to vLLM (which validates all the others)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class OpenAIBody(BaseModel):
    """The fields of an OpenAI request the API checks itself; every other field goes to vLLM as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(max_length=512, description="The base model's name, or the name of one of your adapters")
    stream: bool | None = None
    n: int | None = Field(None, ge=1, le=128, description="Choices; at most TUNESERVE_MAX_CHOICES_PER_REQUEST")
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32, description="At most TUNESERVE_SERVING_MAX_TOKENS")

    def forwarded(self, model: str, *, cache_salt: str) -> dict[str, Any]:
        """The body to send to serving: what the client sent, with `model` as serving knows it and the tenant's
        `cache_salt` (core.serving_contract.tenant_cache_salt). A client's own cache_salt is refused (a 422 naming
        it), never passed on: with it one tenant could share another's prefix cache."""
        if "cache_salt" in (self.model_extra or {}):
            raise InvalidInput(
                "cache_salt is set by the API for each tenant; do not send one",
                param="cache_salt",
                code="unsupported_field",
            )
        body = self.model_dump(exclude_unset=True)
        body["model"] = model
        body["cache_salt"] = cache_salt
        return body


class CompletionBody(OpenAIBody):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="A prompt, a list of prompts, or token ids (one list, or a list of lists)")


# Content parts a text model takes; media parts (image_url, input_audio, video_url, file...) make vLLM fetch URLs
# from the serving host for a multimodal base, so they are refused here on every base this API serves.
TEXT_PARTS = frozenset({"text"})


class ChatCompletionBody(OpenAIBody):
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)

    def forwarded(self, model: str, *, cache_salt: str) -> dict[str, Any]:
        for i, message in enumerate(self.messages):
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
        return super().forwarded(model, cache_salt=cache_salt)

    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_INT32, description="At most TUNESERVE_SERVING_MAX_TOKENS"
    )
