"""Declarative graders: what GRPO rewards and what an evaluation can score, with no user code on a worker.

A grader scores one model output (text) against its example's reference column, in [0, 1]:

- `string_check`: `equals` / `contains` (the reference, case-insensitive unless `case_sensitive`) or `regex`
  (the output matches `pattern`; `{reference}` in the pattern stands for the escaped reference);
- `json_schema`: 1 when the output parses as JSON and validates against `schema`;
- `length`: 1 up to `max_chars`, then linearly down to 0 at twice that (a length penalty);
- `weighted`: the weighted mean of other graders (`weights` positive, normalised to sum to 1).

Everything is checked when the job or evaluation is created (a bad regex or schema is a 422 naming the field).
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import InvalidInput

MAX_PATTERN_CHARS = 512
MAX_SCHEMA_CHARS = 16_384
MAX_GRADER_DEPTH = 3
# Columns a row offers a grader: the reference answer (a supervised row's last assistant turn, a pair's chosen answer).
REFERENCE_COLUMNS = ("reference",)


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(None, min_length=1, max_length=64, description="Shown in metrics; default: the type")


class StringCheck(_Grader):
    type: Literal["string_check"]
    operation: Literal["equals", "contains", "regex"] = "equals"
    reference: Literal["reference"] = Field("reference", description="The row's column to compare with")
    pattern: str | None = Field(
        None, min_length=1, max_length=MAX_PATTERN_CHARS, description="regex only; {reference} is the escaped reference"
    )
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _check(self) -> StringCheck:
        if self.operation == "regex":
            if self.pattern is None:
                raise ValueError("pattern is required for operation regex")
            try:
                re.compile(self.pattern.replace("{reference}", "x"))
            except re.error as e:
                raise ValueError(f"pattern is not a valid regular expression: {e}") from None
        elif self.pattern is not None:
            raise ValueError(f"pattern applies to operation regex only, not {self.operation}")
        return self

    def score(self, output: str, reference: str) -> float:
        out, ref = output.strip(), reference.strip()
        flags = 0 if self.case_sensitive else re.IGNORECASE
        if self.operation == "regex":
            assert self.pattern is not None
            pattern = self.pattern.replace("{reference}", re.escape(ref))
            return float(re.search(pattern, out, flags) is not None)
        if not self.case_sensitive:
            out, ref = out.lower(), ref.lower()
        return float(out == ref) if self.operation == "equals" else float(ref in out)


class JsonSchema(_Grader):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema", description="A JSON Schema (draft 2020-12)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> JsonSchema:
        from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
        from jsonschema.exceptions import SchemaError  # type: ignore[import-untyped]

        if len(json.dumps(self.json_schema)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"schema is longer than {MAX_SCHEMA_CHARS} characters")
        try:
            Draft202012Validator.check_schema(self.json_schema)
        except SchemaError as e:
            raise ValueError(f"schema is not a valid JSON Schema: {e.message}") from None
        return self

    @cached_property
    def _validator(self) -> Any:
        from jsonschema import Draft202012Validator

        return Draft202012Validator(self.json_schema)

    def score(self, output: str, reference: str) -> float:
        try:
            value = json.loads(output.strip())
        except (ValueError, RecursionError):
            return 0.0
        return float(self._validator.is_valid(value))


class LengthPenalty(_Grader):
    type: Literal["length"]
    max_chars: int = Field(ge=1, le=1_000_000, description="Outputs up to this long score 1; 0 at twice as long")

    def score(self, output: str, reference: str) -> float:
        over = len(output.strip()) - self.max_chars
        return 1.0 if over <= 0 else max(0.0, 1.0 - over / self.max_chars)


class WeightedItem(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    grader: Grader
    weight: float = Field(1.0, gt=0, le=1e6)


class Weighted(_Grader):
    type: Literal["weighted"]
    graders: list[WeightedItem] = Field(min_length=1, max_length=16)

    def score(self, output: str, reference: str) -> float:
        total = sum(item.weight for item in self.graders)
        return sum(item.weight * item.grader.score(output, reference) for item in self.graders) / total


Grader = Annotated[StringCheck | JsonSchema | LengthPenalty | Weighted, Field(discriminator="type")]
WeightedItem.model_rebuild()


class GraderSpec(BaseModel):
    """The `grader` of a GRPO job or an evaluation (a wrapper so one type checks every variant)."""

    model_config = ConfigDict(extra="forbid")

    grader: Grader


def _depth(grader: Any) -> int:
    if isinstance(grader, Weighted):
        return 1 + max(_depth(item.grader) for item in grader.graders)
    return 1


def parse_grader(value: Any, *, param: str = "grader") -> Any:
    """A validated grader from its JSON, or a 422 naming the field."""
    from pydantic import ValidationError

    try:
        grader = GraderSpec.model_validate({"grader": value}).grader
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:] if not isinstance(p, str) or p not in _VARIANT_TAGS)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "value_error":
            # A cross-field check (ours) starts its message with the field it is about: name that field.
            field = message.split(" ", 1)[0]
            where = f"{where}.{field}" if where else field
        path = f"{param}.{where}" if where else param
        raise InvalidInput(f"{path}: {message}", param=path) from None
    if _depth(grader) > MAX_GRADER_DEPTH:
        raise InvalidInput(f"{param}: weighted graders nest at most {MAX_GRADER_DEPTH} deep", param=param)
    return grader


# pydantic puts the union member's tag in an error's location; it is not a field the user wrote.
_VARIANT_TAGS = frozenset({"string_check", "json_schema", "length", "weighted"})


def grader_name(grader: Any) -> str:
    return str(grader.name or grader.type)


def score(grader: Any, output: str, reference: str) -> float:
    return float(grader.score(output, reference))
