"""OpenAI's graders over the one grader module (core/graders.py): validate, run, and the native grader of an RFT job.

A grader is rebuilt from an allowlist of OpenAI's fields (anything else is a 400 naming it); `python` and the model
graders are refused with a 400 saying why. What a reinforcement job stores is the native `{"type": "openai",
"grader": ...}` grader, scored by the same code in the GRPO child as here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.services import openai_fine_tuning
from core.errors import InvalidInput
from core.graders import OpenAIGraderSpec, check_encodable, grade_openai, parse_grader, parse_openai_grader

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
_FLAG_OF_ERROR = {"invalid_variable_error": "invalid_variable_error", "formula_error": "formula_parse_error"}


class GraderValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]


class GraderRunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]
    model_sample: str = Field(max_length=1_000_000)
    item: Any = None


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


def _parse(grader: Any, param: str) -> Any:
    try:
        return parse_openai_grader(grader, param=param)
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


def validate_grader(body: Mapping[str, Any]) -> GraderValidateResponse:
    """The grader as it will run, or a 400 naming the field that keeps it from running."""
    request: GraderValidateBody = _body(GraderValidateBody, body)
    return GraderValidateResponse(grader=_parse(request.grader, "grader").model_dump(mode="json", exclude_none=True))


def run_grader(body: Mapping[str, Any]) -> GraderRunResponse:
    """One model sample (and its dataset item) graded as a reinforcement job's reward would grade it."""
    request: GraderRunBody = _body(GraderRunBody, body)
    grader = _parse(request.grader, "grader")
    started = time.perf_counter()
    result = grade_openai(grader, request.model_sample, request.item)
    flags: dict[str, Any] = dict.fromkeys(_ERROR_FLAGS, False)
    for error in result.errors:
        flags[_FLAG_OF_ERROR.get(error, "other_error")] = True
    sub_rewards = result.scores if grader.type == "multi" else {}
    return GraderRunResponse(
        metadata=GraderRunMetadata(
            errors=flags,
            execution_time=time.perf_counter() - started,
            name=grader.name,
            scores={grader.name: result.reward, **sub_rewards},
            type=grader.type,
        ),
        reward=result.reward,
        sub_rewards=sub_rewards,
    )
