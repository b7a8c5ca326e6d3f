"""The HTTP contract between api and serving: request and response bodies (pydantic only, no vLLM import)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.bounds import MAX_INT32, MAX_INT64, MIN_INT64

TOKEN_HEADER = "X-Tuneserve-Serving-Token"
# A cheap bound before tokenizing; the real limit is settings.serving_max_prompt_tokens.
MAX_PROMPT_CHARS = 1_000_000
# Schema bounds (the API checks its settings, e.g. max_messages_per_request, within them).
MAX_MESSAGES = 4096
MAX_STOP_CHARS = 1024


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class SamplingOptions(BaseModel):
    """Sampling knobs, named as in the OpenAI API (top_k as in vLLM's extension)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(
        None, ge=1, le=MAX_INT32, description="Default: as many as fit, up to serving_max_tokens"
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

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False


class ServingRequest(GenerateRequest):
    """What the API sends to serving: the request plus the adapter name (None: the base model)."""

    adapter: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResult(BaseModel):
    """A finished generation."""

    model: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


class GenerateChunk(BaseModel):
    """One server-sent event of a streamed generation: the new text and tokens since the last event."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = Field(None, description="On the last event only")


class AdapterUnloaded(BaseModel):
    name: str
    unloaded: bool
