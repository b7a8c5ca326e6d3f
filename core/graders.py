"""Declarative graders: what GRPO rewards and what an evaluation can score, with no user code on a worker.

A grader scores one model output (text) against its example's reference column, in [0, 1]:

- `string_check`: `equals` / `contains` (the reference, case-insensitive unless `case_sensitive`) or `regex`
  (the output matches `pattern`; `{reference}` in the pattern stands for the escaped reference);
- `json_schema`: 1 when the output parses as JSON and validates against `schema`;
- `length`: 1 up to `max_chars`, then linearly down to 0 at twice that (a length penalty);
- `weighted`: the weighted mean of other graders (`weights` positive, normalised to sum to 1).

Everything is checked when the job or evaluation is created (a bad regex or schema is a 422 naming the field).

A grader is tenant input run on a worker, so it may reach nothing and cost bounded time (docs/security.md):
regexes (`pattern`, and a schema's `pattern`) run on RE2, linear in the text, so no backreferences or lookaround;
a schema's references are local only (`#...`; any other `$ref` is a 422) and its validator has an empty registry
that retrieves nothing, so no URL or file is ever opened; `patternProperties` is refused (jsonschema matches it
with Python's backtracking `re` in three keywords; `propertyNames` with a `pattern` says the same on RE2).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from typing import Annotated, Any, Literal

import re2  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import InvalidInput

MAX_PATTERN_CHARS = 512
MAX_SCHEMA_CHARS = 16_384
MAX_GRADER_DEPTH = 3
# Columns a row offers a grader: the reference answer (a supervised row's last assistant turn, a pair's chosen answer).
REFERENCE_COLUMNS = ("reference",)


# Keywords whose string value is a URI reference another schema is fetched from.
_REF_KEYWORDS = frozenset({"$ref", "$dynamicRef", "$recursiveRef"})


def _re2_compile(pattern: str, *, case_sensitive: bool = True) -> Any:
    """An RE2 regex (linear-time matching), or re2.error with a message saying why not."""
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False  # RE2 otherwise prints every bad tenant pattern to the worker's stderr
    return re2.compile(pattern, options)


def _re2_reason(e: Exception) -> str:
    text = e.args[0] if e.args else str(e)
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


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
                _re2_compile(self.pattern.replace("{reference}", "x"))
            except re2.error as e:
                raise ValueError(
                    f"pattern is not a valid RE2 regular expression (no backreferences or lookaround): {_re2_reason(e)}"
                ) from None
        elif self.pattern is not None:
            raise ValueError(f"pattern applies to operation regex only, not {self.operation}")
        return self

    def score(self, output: str, reference: str) -> float:
        out, ref = output.strip(), reference.strip()
        if self.operation == "regex":
            assert self.pattern is not None
            pattern = self.pattern.replace("{reference}", re2.escape(ref))
            try:
                return float(_re2_compile(pattern, case_sensitive=self.case_sensitive).search(out) is not None)
            except re2.error:  # the reference made it too big for RE2's memory bound: no match, not a crash
                return 0.0
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
        for where, key, value in _schema_nodes(self.json_schema, ""):
            if key in _REF_KEYWORDS and isinstance(value, str) and not value.startswith("#"):
                raise ValueError(
                    f"schema refers to {value[:200]!r} at {where}/{key}: only local references (starting with #)"
                    " are allowed; a grader opens no URL or file"
                )
            if key == "patternProperties" and isinstance(value, dict):
                raise ValueError(
                    f"schema uses patternProperties at {where or '/'}: not supported (use propertyNames with a pattern)"
                )
            if key == "pattern" and isinstance(value, str):
                try:
                    _re2_compile(value)
                except re2.error as e:
                    raise ValueError(
                        f"schema pattern at {where or '/'} is not a valid RE2 regular expression: {_re2_reason(e)}"
                    ) from None
        return self

    @cached_property
    def _validator(self) -> Any:
        return _safe_validator_class()(self.json_schema, registry=_empty_registry())

    def score(self, output: str, reference: str) -> float:
        try:
            value = json.loads(output.strip())
        except (ValueError, RecursionError):
            return 0.0
        from referencing.exceptions import Unresolvable

        try:
            return float(self._validator.is_valid(value))
        except (Unresolvable, RecursionError, re2.error):  # a $ref to nothing, a deep output: it does not validate
            return 0.0


def _schema_nodes(node: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    """(JSON pointer of the object, key, value) for every key of every object in a schema, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield where, str(key), value
            yield from _schema_nodes(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schema_nodes(value, f"{where}/{i}")


def _empty_registry() -> Any:
    """A referencing Registry holding nothing whose retrieve always fails (jsonschema's default one uses urlopen).

    jsonschema still adds the draft meta-schemas it ships; anything else a `$ref` names is Unresolvable.
    """
    from referencing import Registry

    return Registry()


def _safe_validator_class() -> Any:
    """Draft 2020-12 with `pattern` matched on RE2 (jsonschema's own uses Python's backtracking `re`)."""
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import ValidationError

    def pattern(validator: Any, patrn: str, instance: Any, _schema: Any) -> Iterator[Any]:
        if validator.is_type(instance, "string") and _re2_compile(patrn).search(instance) is None:
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    return validators.extend(Draft202012Validator, {"pattern": pattern})


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
