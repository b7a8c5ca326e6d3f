"""Declarative graders: what GRPO rewards and what an evaluation can score, with no user code on a worker.

A grader scores one model output (text) against its example's reference column, in [0, 1]:

- `string_check`: `equals` / `contains` (the reference, case-insensitive unless `case_sensitive`) or `regex`
  (the output matches `pattern`; `{reference}` in the pattern stands for the escaped reference);
- `json_schema`: 1 when the output parses as JSON and validates against `schema`;
- `length`: 1 up to `max_chars`, then linearly down to 0 at twice that (a length penalty);
- `weighted`: the weighted mean of other graders (`weights` positive, normalised to sum to 1);
- `openai`: one of OpenAI's fine-tuning graders (`string_check`, `text_similarity`, `multi`; `{"type": "openai",
  "grader": {...}}`), whose `{{sample.output_text}}` / `{{item.<field>}}` templates read the row's own fields.

Everything is checked when the job or evaluation is created (a bad regex or schema is a 422 naming the field).

A grader is tenant input run on a worker, so it may reach nothing and cost bounded time (docs/security.md):
regexes (`pattern`, and a schema's `pattern`) run on RE2, linear in the text, so no backreferences or lookaround;
a schema's references are local only (`#...`; any other `$ref` is a 422) and its validator has an empty registry
that retrieves nothing, so no URL or file is ever opened; `patternProperties` is refused (jsonschema matches it
with Python's backtracking `re` in three keywords; `propertyNames` with a `pattern` says the same on RE2).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Iterator
from functools import cached_property, lru_cache
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

    def score(self, output: str, reference: str, item: Any = None) -> float:
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

    def score(self, output: str, reference: str, item: Any = None) -> float:
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

    def score(self, output: str, reference: str, item: Any = None) -> float:
        over = len(output.strip()) - self.max_chars
        return 1.0 if over <= 0 else max(0.0, 1.0 - over / self.max_chars)


class WeightedItem(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    grader: Grader
    weight: float = Field(1.0, gt=0, le=1e6)


class Weighted(_Grader):
    type: Literal["weighted"]
    graders: list[WeightedItem] = Field(min_length=1, max_length=16)

    def score(self, output: str, reference: str, item: Any = None) -> float:
        total = sum(w.weight for w in self.graders)
        return sum(w.weight * w.grader.score(output, reference, item) for w in self.graders) / total


# --- OpenAI's grader JSON (/v1/fine_tuning method reinforcement, /v1/fine_tuning/alpha/graders) -------------------
#
# Rebuilt from an allowlist: every field is one of OpenAI's, checked here; a `python` grader is refused (no sandbox
# runs tenant code on a worker) and so are the model graders (they would call a model; not offered yet).

MAX_TEMPLATE_CHARS = 16_384
MAX_FORMULA_CHARS = 512
MAX_FORMULA_NODES = 200
# Similarity metrics are quadratic in places (fuzzy_match, rouge_l): each side is cut to this many characters.
MAX_SIMILARITY_CHARS = 10_000
# {{ sample.output_text }}, {{ sample.output_json.a.0 }}, {{ item }}, {{ item.answer }}: a namespace and a dotted path.
_NAMESPACES = ("sample.output_text", "sample.output_json", "item")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_REFUSED_TYPES = {
    "python": "a python grader runs tenant code, and this deployment has no sandbox to run it in (user code never "
    "runs unconfined on a worker); use string_check, text_similarity or multi",
}
MODEL_GRADER_TYPES = ("score_model", "label_model")
_MODEL_GRADERS_HERE = (
    "model graders (score_model, label_model) run in /v1/fine_tuning/alpha/graders/validate and /run only: a "
    "reinforcement job's reward does not call serving from its training child yet; use string_check, "
    "text_similarity or multi"
)
_REFUSED_METRICS = {"cosine": "cosine needs an embeddings model, which this deployment does not serve"}


class MissingVariable(Exception):
    """A template names a field the sample or item does not have."""


def _template_parts(text: str) -> Iterator[tuple[str, str | None]]:
    """(literal text, the variable after it or None at the end): a scan with str.find, linear in the text."""
    at = 0
    while (start := text.find("{{", at)) >= 0:
        end = text.find("}}", start + 2)
        if end < 0:
            raise ValueError("has a {{ with no closing }}")
        yield text[at:start], text[start + 2 : end]
        at = end + 2
    yield text[at:], None


def _variable(inner: str) -> tuple[str, list[str]] | None:
    """A template variable's namespace and path (`item.a.0` is ("item", ["a", "0"])), or None if it is not one."""
    parts = inner.strip().split(".")
    for namespace in _NAMESPACES:
        head = namespace.split(".")
        if parts[: len(head)] == head:
            path = parts[len(head) :]
            if namespace == "sample.output_text" and path:
                return None
            return (namespace, path) if all(p and set(p) <= _PATH_CHARS for p in path) else None
    return None


def _check_template(text: str) -> str:
    for _, inner in _template_parts(text):
        if inner is not None and _variable(inner) is None:
            raise ValueError(
                f"template {{{{{inner[:100]}}}}} is not sample.output_text, sample.output_json[.path] or item[.path]"
            )
    return text


Template = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)]


def _lookup(value: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise MissingVariable(part)
    return value


def render(text: str, sample: str, item: Any) -> str:
    """A template with each {{variable}} replaced by the sample's or item's value (JSON unless a string)."""
    out: list[str] = []
    for literal, inner in _template_parts(text):
        out.append(literal)
        if inner is None:
            break
        found = _variable(inner)
        assert found is not None, "checked when the grader was parsed"
        namespace, path = found
        if namespace == "sample.output_text":
            out.append(sample)
            continue
        if namespace == "sample.output_json":
            try:
                root: Any = json.loads(sample)
            except (ValueError, RecursionError):
                raise MissingVariable("output_json") from None
        else:
            root = item
        value = _lookup(root, path)
        out.append(value if isinstance(value, str) else json.dumps(value))
    return "".join(out)


class GradeResult(BaseModel):
    """What an OpenAI grader made of one sample: its reward, each named grader's score, and what went wrong."""

    reward: float
    scores: dict[str, float]
    errors: list[str] = Field(
        default_factory=list, description="invalid_variable_error, formula_error, model_grader_..."
    )
    detail: str | None = Field(None, description="What a model grader's judge call answered, when it failed")


class _OpenAIGrader(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64)


class OpenAIStringCheck(_OpenAIGrader):
    """eq / ne: the rendered input equals (does not equal) the reference; like / ilike: contains it (ilike any case)."""

    type: Literal["string_check"]
    input: Template
    reference: Template
    operation: Literal["eq", "ne", "like", "ilike"]

    @model_validator(mode="after")
    def _check(self) -> OpenAIStringCheck:
        return _checked_templates(self, "input", "reference")  # type: ignore[no-any-return]

    def grade_one(self, sample: str, item: Any) -> float:
        out, ref = render(self.input, sample, item), render(self.reference, sample, item)
        if self.operation == "eq":
            return float(out == ref)
        if self.operation == "ne":
            return float(out != ref)
        if self.operation == "ilike":
            out, ref = out.lower(), ref.lower()
        return float(ref in out)


class OpenAITextSimilarity(_OpenAIGrader):
    """The rendered input's similarity to the reference, in [0, 1]."""

    type: Literal["text_similarity"]
    input: Template
    reference: Template
    evaluation_metric: Literal[
        "cosine",
        "fuzzy_match",
        "bleu",
        "gleu",
        "meteor",
        "rouge_1",
        "rouge_2",
        "rouge_3",
        "rouge_4",
        "rouge_5",
        "rouge_l",
    ]

    @model_validator(mode="after")
    def _check(self) -> OpenAITextSimilarity:
        if self.evaluation_metric in _REFUSED_METRICS:
            raise ValueError(f"evaluation_metric {self.evaluation_metric}: {_REFUSED_METRICS[self.evaluation_metric]}")
        return _checked_templates(self, "input", "reference")  # type: ignore[no-any-return]

    def grade_one(self, sample: str, item: Any) -> float:
        out = render(self.input, sample, item)[:MAX_SIMILARITY_CHARS]
        ref = render(self.reference, sample, item)[:MAX_SIMILARITY_CHARS]
        return text_similarity(self.evaluation_metric, out, ref)


def _checked_templates(grader: Any, *fields: str) -> Any:
    for field in fields:
        try:
            _check_template(getattr(grader, field))
        except ValueError as e:
            raise ValueError(f"{field} {e}") from None
    return grader


_TOKEN = re.compile(r"\w+|[^\w\s]")  # no nested repetition: linear on Python's re too


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def text_similarity(metric: str, output: str, reference: str) -> float:
    """OpenAI's text_similarity metrics: difflib's ratio, NLTK's sentence BLEU / GLEU / METEOR, rouge-score's F1."""
    if metric == "fuzzy_match":
        from difflib import SequenceMatcher

        return SequenceMatcher(None, output, reference, autojunk=False).ratio()
    if metric.startswith("rouge_"):
        kind = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
        return float(_rouge_scorer(kind).score(reference, output)[kind].fmeasure)
    out, ref = _tokens(output), _tokens(reference)
    if not out or not ref:
        return float(out == ref)
    if metric == "bleu":
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # type: ignore[import-untyped]

        return float(sentence_bleu([ref], out, smoothing_function=SmoothingFunction().method1))
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu  # type: ignore[import-untyped]

        return float(sentence_gleu([ref], out))
    if metric == "meteor":
        from nltk.translate.meteor_score import single_meteor_score  # type: ignore[import-untyped]

        # Exact and stem matches only: NLTK's synonym stage needs WordNet's data, which is not installed.
        return float(single_meteor_score(ref, out, wordnet=_NoWordNet()))
    raise ValueError(f"unknown metric {metric}")  # pragma: no cover - the Literal refuses it


@lru_cache(maxsize=8)
def _rouge_scorer(kind: str) -> Any:
    """One scorer per ROUGE kind (a GRPO step scores every completion with it)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind])


class _NoWordNet:
    """A WordNet with no synsets: METEOR without synonyms, and no corpus to look for on disk."""

    def synsets(self, *_: Any, **__: Any) -> list[Any]:
        return []


SimpleOpenAIGrader = Annotated[OpenAIStringCheck | OpenAITextSimilarity, Field(discriminator="type")]

# calculate_output: arithmetic over the named graders' scores, from an allowlist of syntax; never eval.
_FORMULA_FUNCTIONS: dict[str, Any] = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
_UNARY_FUNCTIONS = frozenset({"abs", "floor", "ceil", "exp", "sqrt", "log"})
_BINARY_OPERATORS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY_OPERATORS: dict[type, Any] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def parse_formula(formula: str, names: Iterator[str] | list[str]) -> ast.expr:
    """calculate_output as a checked expression tree: numbers, grader names, + - * / ** ^, and the allowed functions."""
    allowed = set(names)
    if len(formula) > MAX_FORMULA_CHARS:
        raise ValueError(f"calculate_output is longer than {MAX_FORMULA_CHARS} characters")
    try:
        # OpenAI's formulas write a power as ^: as ** it binds as a power does (Python's ^ is a loose xor). No string
        # literal survives the checks below, so replacing the character changes nothing else.
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError("calculate_output is not an arithmetic expression") from None
    nodes = list(ast.walk(tree.body))
    if len(nodes) > MAX_FORMULA_NODES:
        raise ValueError(f"calculate_output has more than {MAX_FORMULA_NODES} terms")
    functions = ", ".join(_FORMULA_FUNCTIONS)
    for node in nodes:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise ValueError(f"calculate_output has {node.value!r}, which is not a number")
        elif isinstance(node, ast.Name):
            if node.id not in allowed and node.id not in _FORMULA_FUNCTIONS:
                raise ValueError(
                    f"calculate_output names {node.id!r}, which is neither a grader name "
                    f"({', '.join(sorted(allowed))}) nor an allowed function ({functions})"
                )
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in _FORMULA_FUNCTIONS or node.keywords:
                called = ast.unparse(node.func)[:80]
                raise ValueError(f"calculate_output calls {called!r}: only {functions} may be called")
            if any(isinstance(a, ast.Starred) for a in node.args) or not node.args:
                raise ValueError(f"calculate_output calls {name}() with no plain arguments")
            if name in _UNARY_FUNCTIONS and len(node.args) != 1:
                raise ValueError(f"calculate_output calls {name}() with {len(node.args)} arguments, not 1")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY_OPERATORS:
                raise ValueError("calculate_output combines terms with an operator other than + - * / ** ^")
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY_OPERATORS:
                raise ValueError("calculate_output applies an operator other than - or + to one term")
        elif not isinstance(node, ast.Load | ast.operator | ast.unaryop):
            raise ValueError(f"calculate_output uses {type(node).__name__}, which is not arithmetic (not allowed)")
    return tree.body


def evaluate_formula(node: ast.expr, scores: dict[str, float]) -> float:
    """The value of a checked formula; ArithmeticError or ValueError when it has none (a division by zero)."""
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float), "checked by parse_formula"
        return float(node.value)
    if isinstance(node, ast.Name):
        return scores[node.id]
    if isinstance(node, ast.UnaryOp):
        return float(_UNARY_OPERATORS[type(node.op)](evaluate_formula(node.operand, scores)))
    if isinstance(node, ast.BinOp):
        left, right = evaluate_formula(node.left, scores), evaluate_formula(node.right, scores)
        value = _BINARY_OPERATORS[type(node.op)](left, right)
        if isinstance(value, complex):  # a negative number to a fractional power
            raise ValueError("complex result")
        return float(value)
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name), "checked by parse_formula"
    return float(_FORMULA_FUNCTIONS[node.func.id](*(evaluate_formula(a, scores) for a in node.args)))


class OpenAIMulti(_OpenAIGrader):
    """calculate_output over named graders' scores (a name is a key of `graders`)."""

    type: Literal["multi"]
    graders: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], SimpleOpenAIGrader] = Field(
        min_length=1, max_length=16
    )
    calculate_output: str = Field(min_length=1, max_length=MAX_FORMULA_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _one_grader(cls, data: Any) -> Any:
        # The openai client types `graders` as one grader (its API reference as a map of them): one goes by its name.
        if isinstance(data, dict) and isinstance(data.get("graders"), dict) and "type" in data["graders"]:
            one = data["graders"]
            return {**data, "graders": {str(one.get("name", "")): one}}
        return data

    @model_validator(mode="after")
    def _check(self) -> OpenAIMulti:
        clash = [n for n in self.graders if n in _FORMULA_FUNCTIONS]
        if clash:
            raise ValueError(f"graders {clash[0]!r}: a grader name may not be a function name of calculate_output")
        parse_formula(self.calculate_output, list(self.graders))
        return self

    @cached_property
    def _formula(self) -> ast.expr:
        return parse_formula(self.calculate_output, list(self.graders))

    def grade(self, sample: str, item: Any) -> GradeResult:
        scores: dict[str, float] = {}
        errors: list[str] = []
        for name, grader in self.graders.items():
            one = _grade_simple(grader, sample, item)
            scores[name] = one.reward
            errors += [e for e in one.errors if e not in errors]
        try:
            reward = evaluate_formula(self._formula, scores)
            if not math.isfinite(reward):
                raise ValueError("not finite")
        except (ArithmeticError, ValueError, TypeError):
            return GradeResult(reward=0.0, scores=scores, errors=[*errors, "formula_error"])
        return GradeResult(reward=reward, scores=scores, errors=errors)


def _grade_simple(grader: OpenAIStringCheck | OpenAITextSimilarity, sample: str, item: Any) -> GradeResult:
    try:
        reward = grader.grade_one(sample, item)
    except MissingVariable:
        return GradeResult(reward=0.0, scores={grader.name: 0.0}, errors=["invalid_variable_error"])
    return GradeResult(reward=reward, scores={grader.name: reward})


OpenAIGraderModel = Annotated[OpenAIStringCheck | OpenAITextSimilarity | OpenAIMulti, Field(discriminator="type")]


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]
    text: Template


class JudgeMessage(BaseModel):
    """One message of a model grader's input: text only (an image or audio part is refused naming it)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system", "developer"]
    content: Template | list[_TextPart] = Field(union_mode="left_to_right")
    type: Literal["message"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        content = data.get("content") if isinstance(data, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text"):
                raise ValueError(
                    f"content.{j}.type must be input_text or output_text: the judge takes text only "
                    f"(got {str(kind)[:40]!r})"
                )
        return data

    @model_validator(mode="after")
    def _check(self) -> JudgeMessage:
        texts = [self.content] if isinstance(self.content, str) else [p.text for p in self.content]
        for text in texts:
            try:
                _check_template(text)
            except ValueError as e:
                raise ValueError(f"content {e}") from None
        return self

    def rendered(self, sample: str, item: Any) -> dict[str, str]:
        texts = [self.content] if isinstance(self.content, str) else [p.text for p in self.content]
        # vLLM's chat templates know system, not OpenAI's newer developer role (the same instruction level).
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": "".join(render(t, sample, item) for t in texts)}


class JudgeSampling(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_completions_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    reasoning_effort: str | None = Field(None, max_length=16, description="Accepted; the served models ignore it")


class _OpenAIModelGrader(_OpenAIGrader):
    """A grader whose verdict is a model's answer: a model this deployment serves, asked through its serving only."""

    model: str = Field(min_length=1, max_length=512, description="The served base, or one of the tenant's models")
    input: list[JudgeMessage] = Field(min_length=1, max_length=32)
    sampling_params: JudgeSampling | None = None

    def judge_messages(self, sample: str, item: Any) -> list[dict[str, str]]:
        """The messages the judge answers (MissingVariable when a template names a field the item lacks)."""
        return [m.rendered(sample, item) for m in self.input]

    def _answer_schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def response_format(self) -> dict[str, Any]:
        """Structured output: the judge's answer is {"result": ...} as vLLM's guided decoding constrains it."""
        schema = {"type": "object", "properties": {"result": self._answer_schema()}, "required": ["result"]}
        return {"type": "json_schema", "json_schema": {"name": "grade", "schema": schema}}


def _answer_result(text: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value.get("result") if isinstance(value, dict) else None


class OpenAIScoreModel(_OpenAIModelGrader):
    """The judge's number, clamped to `range` (default [0, 1])."""

    type: Literal["score_model"]
    range: list[float] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _check(self) -> OpenAIScoreModel:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high; got {self.range}")
        return self

    def _answer_schema(self) -> dict[str, Any]:
        low, high = self.range or [0.0, 1.0]
        return {"type": "number", "minimum": low, "maximum": high}

    def reward_of(self, text: str) -> float | None:
        """The score in the judge's answer, or None when it holds none."""
        result = _answer_result(text)
        if isinstance(result, bool) or not isinstance(result, int | float) or not math.isfinite(result):
            return None
        low, high = self.range or [0.0, 1.0]
        return float(min(max(result, low), high))


class OpenAILabelModel(_OpenAIModelGrader):
    """1 when the judge's label is one of `passing_labels`, else 0."""

    type: Literal["label_model"]
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1, max_length=32)
    passing_labels: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _check(self) -> OpenAILabelModel:
        unknown = [label for label in self.passing_labels if label not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels must be among labels; {unknown[0]!r} is not")
        return self

    def _answer_schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.labels)}

    def reward_of(self, text: str) -> float | None:
        result = _answer_result(text)
        if not isinstance(result, str) or result not in self.labels:
            return None
        return float(result in self.passing_labels)


ModelGrader = OpenAIScoreModel | OpenAILabelModel
AnyOpenAIGrader = OpenAIStringCheck | OpenAITextSimilarity | OpenAIMulti | OpenAIScoreModel | OpenAILabelModel


def grade_openai(grader: OpenAIStringCheck | OpenAITextSimilarity | OpenAIMulti, sample: str, item: Any) -> GradeResult:
    """An OpenAI grader's reward for one sample (the model's output text) and its dataset item."""
    if isinstance(grader, OpenAIMulti):
        return grader.grade(sample, item)
    return _grade_simple(grader, sample, item)


class _OpenAISpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: OpenAIGraderModel


class _OpenAISpecWithModels(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: Annotated[AnyOpenAIGrader, Field(discriminator="type")]


def _refused_type(value: Any, where: str, *, model_graders: bool = False) -> tuple[str, str] | None:
    """(field, why) for a grader type that is refused on purpose, so its 400 says why rather than 'unknown'."""
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if isinstance(kind, str) and kind in _REFUSED_TYPES:
        return f"{where}.type", f"{kind}: {_REFUSED_TYPES[kind]}"
    if kind in MODEL_GRADER_TYPES and not model_graders:
        return f"{where}.type", f"{kind}: {_MODEL_GRADERS_HERE}"
    if kind == "multi" and isinstance(value.get("graders"), dict):
        inner = value["graders"]
        if "type" in inner:
            return _refused_type(inner, f"{where}.graders")
        for name, sub in inner.items():
            if isinstance(sub, dict) and sub.get("type") in ("multi", *MODEL_GRADER_TYPES):
                return f"{where}.graders.{name}.type", "a multi grader's graders are string_check or text_similarity"
            found = _refused_type(sub, f"{where}.graders.{name}")
            if found:
                return found
    return None


def check_encodable(value: Any, param: str) -> None:
    """A 422 naming the first string (key or value) in a JSON value that UTF-8 cannot hold (a lone surrogate)."""
    stack: list[tuple[Any, str]] = [(value, param)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            paths = {k: f"{where}.{k}" if where else str(k) for k in node}
            stack += [(k, paths[k]) for k in node] + [(v, paths[k]) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(node)]
        elif isinstance(node, str) and not node.isascii():
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                where = where.encode("utf-8", "backslashreplace").decode()
                raise InvalidInput(f"{where}: contains an unpaired surrogate (\\ud800-\\udfff)", param=where) from None


def parse_openai_grader(value: Any, *, param: str = "grader", model_graders: bool = False) -> Any:
    """A validated OpenAI grader from its JSON, or a 422 naming the field (the OpenAI routes answer it as a 400).

    model_graders: whether score_model and label_model are taken (the graders routes); a job's reward refuses them.
    """
    from pydantic import ValidationError

    refused = _refused_type(value, param, model_graders=model_graders)
    if refused is not None:
        raise InvalidInput(f"{refused[0]}: {refused[1]}", param=refused[0])
    check_encodable(value, param)
    spec = _OpenAISpecWithModels if model_graders else _OpenAISpec
    try:
        return spec.model_validate({"grader": value}).grader
    except ValidationError as e:
        path, message = _error_path(e, param, _OPENAI_VARIANT_TAGS)
        kind = e.errors()[0]["type"]
        if kind == "extra_forbidden":
            message = "is not a field of this grader"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            path, message = f"{path}.type", f"{message} (a python grader is refused, saying why)"
        raise InvalidInput(f"{path}: {message}", param=path) from None


_OPENAI_VARIANT_TAGS = frozenset(
    {"string_check", "text_similarity", "multi", "score_model", "label_model", "constrained-str", "list[_TextPart]"}
)


class OpenAIGraderSpec(_Grader):
    """An OpenAI grader as a native one (what the /v1 fine-tuning API stores in a GRPO job)."""

    type: Literal["openai"]
    grader: OpenAIGraderModel

    @model_validator(mode="before")
    @classmethod
    def _allowlist(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refused = _refused_type(data.get("grader"), "grader")
            if refused is not None:
                raise ValueError(f"{refused[0]} {refused[1]}")
        return data

    def score(self, output: str, reference: str, item: Any = None) -> float:
        return grade_openai(self.grader, output, {"reference": reference} if item is None else item).reward


Grader = Annotated[StringCheck | JsonSchema | LengthPenalty | Weighted | OpenAIGraderSpec, Field(discriminator="type")]
WeightedItem.model_rebuild()


class GraderSpec(BaseModel):
    """The `grader` of a GRPO job or an evaluation (a wrapper so one type checks every variant)."""

    model_config = ConfigDict(extra="forbid")

    grader: Grader


def _depth(grader: Any) -> int:
    if isinstance(grader, Weighted):
        return 1 + max(_depth(item.grader) for item in grader.graders)
    return 1


def _error_path(e: Any, param: str, tags: frozenset[str]) -> tuple[str, str]:
    """The field a pydantic error is about, under param, and its message (the first error)."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"][1:] if not isinstance(p, str) or p not in tags)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        # A cross-field check (ours) starts its message with the field it is about: name that field.
        field = message.split(" ", 1)[0]
        where = f"{where}.{field}" if where else field
    return (f"{param}.{where}" if where else param), message


def parse_grader(value: Any, *, param: str = "grader") -> Any:
    """A validated grader from its JSON, or a 422 naming the field."""
    from pydantic import ValidationError

    try:
        grader = GraderSpec.model_validate({"grader": value}).grader
    except ValidationError as e:
        path, message = _error_path(e, param, _VARIANT_TAGS)
        raise InvalidInput(f"{path}: {message}", param=path) from None
    if _depth(grader) > MAX_GRADER_DEPTH:
        raise InvalidInput(f"{param}: weighted graders nest at most {MAX_GRADER_DEPTH} deep", param=param)
    return grader


# pydantic puts the union member's tag in an error's location; it is not a field the user wrote.
_VARIANT_TAGS = frozenset({"string_check", "json_schema", "length", "weighted", "openai", "text_similarity", "multi"})


def grader_name(grader: Any) -> str:
    if isinstance(grader, OpenAIGraderSpec) and grader.name is None:
        return grader.grader.name
    return str(grader.name or grader.type)


def score(grader: Any, output: str, reference: str, item: Any = None) -> float:
    """A grader's score for one output; item is the row's fields for OpenAI templates (default: its reference)."""
    return float(grader.score(output, reference, item))
