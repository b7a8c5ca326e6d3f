"""OpenAI's graders over the one grader module (core/graders.py): validate, run, and the native grader of an RFT job.

A grader is rebuilt from an allowlist of OpenAI's fields (anything else is a 400 naming it); `python` is refused with
a 400 saying why. What a reinforcement job stores is the native `{"type": "openai", "grader": ...}` grader, scored by
the same code in the GRPO child as here. A model grader (score_model, label_model) runs here only: its judge is a
model this deployment serves (the base or one of the tenant's), asked through the same path as the tenant's own
/v1/chat/completions (the tenant check, limits, cache_salt and slots), never a URL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.generation_schemas import ChatCompletionBody
from api.services import generation, openai_fine_tuning
from api.services.serving_client import ServingClient
from core.errors import InvalidInput, NotFound, TuneserveError
from core.graders import (
    GradeResult,
    MissingVariable,
    ModelGrader,
    OpenAIGraderSpec,
    OpenAILabelModel,
    OpenAIScoreModel,
    check_encodable,
    grade_openai,
    parse_grader,
    parse_openai_grader,
)
from core.serving_contract import CHAT_COMPLETIONS_PATH, tenant_cache_salt
from core.settings import Settings

# The error flags OpenAI's run answers with (openai/types/fine_tuning/alpha/grader_run_response.py), all false
# unless one of ours maps to it.
_ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
# Ours -> OpenAI's: a formula without a value (a division by zero) is reported as OpenAI reports a formula's failure.
_FLAG_OF_ERROR = {
    "invalid_variable_error": "invalid_variable_error",
    "formula_error": "formula_parse_error",
    "model_grader_parse_error": "model_grader_parse_error",
    "model_grader_server_error": "model_grader_server_error",
}
JUDGE_MAX_TOKENS = 256  # a judge's answer is {"result": ...}: short unless its sampling_params say otherwise


class GraderValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]


class GraderRunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]
    model_sample: str = Field(max_length=1_000_000)
    item: Any = None


@dataclass(frozen=True)
class GraderContext:
    """What a model grader's judge call needs of the request: the tenant and the deployment's serving."""

    request: Request
    session: Session
    settings: Settings
    tenant: str
    serving: ServingClient


class GraderValidateResponse(BaseModel):
    """openai.types.fine_tuning.alpha.GraderValidateResponse: the grader as it will run."""

    grader: dict[str, Any]


class GraderRunMetadata(BaseModel):
    errors: dict[str, Any]
    execution_time: float
    name: str
    sampled_model_name: str | None = None
    scores: dict[str, float]
    token_usage: int | None = None
    type: str


class GraderRunResponse(BaseModel):
    """openai.types.fine_tuning.alpha.GraderRunResponse."""

    metadata: GraderRunMetadata
    model_grader_token_usage_per_model: dict[str, Any] = Field(default_factory=dict)
    reward: float
    sub_rewards: dict[str, float]


def _bad_request(e: InvalidInput) -> openai_fine_tuning.BadRequest:
    return openai_fine_tuning.BadRequest(e.message, param=e.param, code="invalid_grader")


def _parse(grader: Any, param: str, *, model_graders: bool = False) -> Any:
    try:
        return parse_openai_grader(grader, param=param, model_graders=model_graders)
    except InvalidInput as e:
        raise _bad_request(e) from None


def native_grader_from_openai(grader: Mapping[str, object], param: str) -> dict[str, Any]:
    """The native grader JSON (JobSpec.grader) for an OpenAI grader; a refused one is a 400 naming the field."""
    parsed = _parse(dict(grader), param)
    native = {"type": "openai", "grader": parsed.model_dump(mode="json", exclude_none=True)}
    assert isinstance(parse_grader(native, param=param), OpenAIGraderSpec), "the native union takes it as is"
    return native


def _body(model: type[BaseModel], body: Mapping[str, Any]) -> Any:
    try:
        check_encodable(dict(body), "")  # every string the answer may echo (a field name, the item) is UTF-8
    except InvalidInput as e:
        raise _bad_request(e) from None
    try:
        return model.model_validate(dict(body))
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        what = "is not a field of this request" if first["type"] == "extra_forbidden" else first["msg"]
        raise openai_fine_tuning.BadRequest(f"{param}: {what}", param=param, code="invalid_value") from None


async def validate_grader(body: Mapping[str, Any], ctx: GraderContext) -> GraderValidateResponse:
    """The grader as it will run, or a 400 naming the field that keeps it from running (a judge not served: 404)."""
    request: GraderValidateBody = _body(GraderValidateBody, body)
    grader = _parse(request.grader, "grader", model_graders=True)
    if isinstance(grader, OpenAIScoreModel | OpenAILabelModel):
        await _judge_adapter(grader, ctx)
    return GraderValidateResponse(grader=grader.model_dump(mode="json", exclude_none=True))


async def run_grader(body: Mapping[str, Any], ctx: GraderContext) -> GraderRunResponse:
    """One model sample (and its dataset item) graded as a reinforcement job's reward would grade it."""
    request: GraderRunBody = _body(GraderRunBody, body)
    grader = _parse(request.grader, "grader", model_graders=True)
    started = time.perf_counter()
    usage: dict[str, Any] = {}
    if isinstance(grader, OpenAIScoreModel | OpenAILabelModel):
        result, usage = await _judge(grader, request.model_sample, request.item, ctx)
    else:  # similarity metrics are CPU work: not on the event loop
        result = await run_in_threadpool(grade_openai, grader, request.model_sample, request.item)
    flags: dict[str, Any] = dict.fromkeys(_ERROR_FLAGS, False)
    for error in result.errors:
        flags[_FLAG_OF_ERROR.get(error, "other_error")] = True
    if result.detail:
        flags["model_grader_server_error_details"] = result.detail
    sub_rewards = result.scores if grader.type == "multi" else {}
    return GraderRunResponse(
        metadata=GraderRunMetadata(
            errors=flags,
            execution_time=time.perf_counter() - started,
            name=grader.name,
            scores={grader.name: result.reward, **sub_rewards},
            token_usage=usage.get("total_tokens") if usage else None,
            type=grader.type,
        ),
        model_grader_token_usage_per_model={grader.model: usage} if usage else {},
        reward=result.reward,
        sub_rewards=sub_rewards,
    )


def _as_grader_field(e: TuneserveError, field: str) -> TuneserveError:
    """A refusal of the judge's request re-worded as one of the grader's field (OpenAI's 400; a 404 stays)."""
    if isinstance(e, NotFound):
        e.param = field
        return e
    return openai_fine_tuning.BadRequest(f"{field}: {e.message}", param=field, code=e.code)


async def _judge_adapter(grader: ModelGrader, ctx: GraderContext) -> str | None:
    """The tenant's adapter the judge names (None: the base), through the one resolution point /v1 uses."""
    try:
        return await generation.resolve_adapter(ctx.session, ctx.settings, ctx.tenant, grader.model, param="model")
    except TuneserveError as e:
        raise _as_grader_field(e, "grader.model") from None


def _judge_body(grader: ModelGrader, messages: list[dict[str, str]], settings: Settings) -> ChatCompletionBody:
    sampling = grader.sampling_params
    fields: dict[str, Any] = {
        "model": grader.model,
        "messages": messages,
        "max_completion_tokens": (sampling.max_completions_tokens if sampling else None) or JUDGE_MAX_TOKENS,
        "response_format": grader.response_format(),
    }
    if sampling is not None:
        fields |= {
            k: v for k, v in sampling.model_dump(include={"seed", "temperature", "top_p"}).items() if v is not None
        }
    try:
        chat = ChatCompletionBody.model_validate(fields)
        chat.check_fields()
        generation.check_generation_limits(settings, chat.model_dump(exclude_unset=True))
        generation.check_prompt_size(settings, messages=chat.messages)
    except ValidationError as e:
        raise openai_fine_tuning.BadRequest(f"grader.input: {e.errors()[0]['msg']}", param="grader.input") from None
    except TuneserveError as e:
        field = "grader.sampling_params" if e.param and "token" in e.param else "grader.input"
        raise _as_grader_field(e, field) from None
    return chat


async def _judge(grader: ModelGrader, sample: str, item: Any, ctx: GraderContext) -> tuple[GradeResult, dict[str, Any]]:
    """The judge's verdict on one sample: its chat completion on the rendered input, as the grader reads it."""
    adapter = await _judge_adapter(grader, ctx)  # a judge this deployment does not serve is refused, item or not
    try:
        messages = grader.judge_messages(sample, item)
    except MissingVariable:
        return GradeResult(reward=0.0, scores={grader.name: 0.0}, errors=["invalid_variable_error"]), {}
    chat = _judge_body(grader, messages, ctx.settings)
    forwarded = chat.forwarded(
        adapter or ctx.settings.served_model_name, cache_salt=tenant_cache_salt(ctx.settings, ctx.tenant)
    )
    slots = generation.generation_slots(ctx.request.app.state, ctx.settings)
    try:
        answer = await generation.complete(
            ctx.request, ctx.serving, slots, ctx.tenant, CHAT_COMPLETIONS_PATH, forwarded, adapter=adapter, rename={}
        )
    except TuneserveError as e:
        if 400 <= e.status_code < 500 and e.status_code != 429:
            raise _as_grader_field(e, "grader.input") from None  # the judge's request itself was refused
        failed = GradeResult(reward=0.0, scores={grader.name: 0.0}, errors=["model_grader_server_error"])
        return failed.model_copy(update={"detail": e.message}), {}
    raw_usage = answer.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    try:
        text = str(answer["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        text = ""
    reward = grader.reward_of(text)
    if reward is None:
        return GradeResult(reward=0.0, scores={grader.name: 0.0}, errors=["model_grader_parse_error"]), usage
    return GradeResult(reward=reward, scores={grader.name: reward}), usage
