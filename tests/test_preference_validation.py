"""Preference datasets, graders and objective knobs: validated before anything runs (pure Python, no stack)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.dataset_formats import (
    OBJECTIVES_BY_FORMAT,
    DatasetFormat,
    DatasetLineError,
    as_messages,
    dump_jsonl,
    parse_jsonl,
)
from core.demo_data import preference_row, write_demo_preference_dataset
from core.errors import InvalidInput
from core.graders import parse_grader
from core.jobspec import Hyperparameters, JobSpec

LIMITS: dict[str, Any] = {"max_rows": 100, "max_line_bytes": 10_000}
USER = [{"role": "user", "content": "Classify: a good day"}]


def jsonl(*rows: Any) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8")


def error_of(*rows: Any) -> DatasetLineError:
    with pytest.raises(DatasetLineError) as info:
        parse_jsonl(jsonl(*rows), **LIMITS)
    return info.value


# --- dataset formats ---------------------------------------------------------------------------


def test_the_three_preference_formats_parse_to_one_normal_form() -> None:
    pair = {"prompt": USER, "chosen": "positive", "rejected": "negative"}
    rows = {
        DatasetFormat.PREFERENCE: {"prompt": "Classify: a good day", "chosen": "positive", "rejected": "negative"},
        DatasetFormat.OPENAI_PREFERENCE: {
            "input": {"messages": USER},
            "preferred_output": [{"role": "assistant", "content": "positive"}],
            "non_preferred_output": [{"role": "assistant", "content": "negative"}],
        },
    }
    for fmt, row in rows.items():
        parsed = parse_jsonl(jsonl(row), **LIMITS)
        assert parsed.format is fmt and parsed.rows == [pair]
        assert as_messages(parsed.rows[0]) == [*USER, {"role": "assistant", "content": "positive"}]
        assert json.loads(dump_jsonl(parsed.rows)) == pair
    messages = {"prompt": USER, "chosen": [{"role": "assistant", "content": "positive"}], "rejected": "negative"}
    assert parse_jsonl(jsonl(messages), **LIMITS).rows == [pair]
    kto = parse_jsonl(jsonl({"prompt": "hi", "completion": "hello", "label": False}), **LIMITS)
    assert kto.format is DatasetFormat.UNPAIRED
    assert kto.rows == [{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello", "label": False}]


def test_a_dataset_records_which_objectives_it_feeds() -> None:
    assert OBJECTIVES_BY_FORMAT["chat"] == ("sft", "grpo")
    assert OBJECTIVES_BY_FORMAT["preference"] == ("sft", "dpo", "orpo", "kto", "grpo")
    assert OBJECTIVES_BY_FORMAT["openai_preference"] == OBJECTIVES_BY_FORMAT["preference"]
    assert OBJECTIVES_BY_FORMAT["unpaired"] == ("kto",)


GOOD = {"prompt": "hi", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("row", "field", "phrase"),
    [
        ({"prompt": "hi", "chosen": "a"}, "rejected", "is missing"),
        ({"prompt": "hi", "chosen": "a", "rejected": "a"}, "rejected", "must differ"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "must not be empty"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "must be a string or an array"),
        ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role", "one of"),
        (
            {"prompt": [*USER, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "prompt[1].role",
            "must be user on the last message",
        ),
        (
            {"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "chosen[0].role",
            "assistant",
        ),
        ({"prompt": "hi", "chosen": [], "rejected": "b"}, "chosen", "exactly one assistant message"),
        ({"prompt": "hi", "chosen": "a", "rejected": None}, "rejected", "must be a string or an array"),
    ],
)
def test_bad_preference_rows_name_line_and_field(row: dict[str, Any], field: str, phrase: str) -> None:
    err = error_of(GOOD, row)
    assert (err.line, err.field) == (2, field), err.message
    assert phrase in err.message and err.message.startswith("line 2: "), err.message


def test_bad_openai_preference_and_kto_rows_name_line_and_field() -> None:
    openai = {
        "input": {"messages": USER},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    }
    err = error_of(openai, {**openai, "input": {"msgs": []}})
    assert (err.line, err.field) == (2, "input.messages")
    err = error_of(openai, {**openai, "non_preferred_output": "a"})
    assert (err.line, err.field) == (2, "non_preferred_output") and "differ" in err.message
    kto = {"prompt": "hi", "completion": "a", "label": True}
    err = error_of(kto, {**kto, "label": "yes"})
    assert (err.line, err.field) == (2, "label") and "true (desirable) or false" in err.message
    err = error_of(kto, {"prompt": "hi", "completion": "a", "label": 1})
    assert (err.line, err.field) == (2, "label")


def test_demo_preference_pairs_prefer_the_right_label(tmp_path: Any) -> None:
    train, test = write_demo_preference_dataset(tmp_path, n_train=16, n_test=4, seed=0)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 16 and {r["chosen"] for r in rows} <= {"positive", "negative"}
    assert all(r["rejected"] != r["chosen"] for r in rows)
    assert parse_jsonl(test.read_bytes(), **LIMITS).format is DatasetFormat.PREFERENCE
    chat = {"messages": [*USER, {"role": "assistant", "content": "positive"}]}
    assert preference_row(chat) == {"prompt": USER, "chosen": "positive", "rejected": "negative"}


# --- graders -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        ({"type": "string_check", "operation": "regex", "pattern": "(("}, "grader.pattern"),
        ({"type": "string_check", "operation": "regex"}, "grader.pattern"),
        ({"type": "string_check", "operation": "equals", "pattern": "x"}, "grader.pattern"),
        ({"type": "string_check", "reference": "label"}, "grader.reference"),
        ({"type": "json_schema", "schema": {"type": "nope"}}, "grader.schema"),
        ({"type": "length"}, "grader.max_chars"),
        ({"type": "python", "source": "print(1)"}, "grader"),
        (
            {
                "type": "weighted",
                "graders": [{"grader": {"type": "string_check", "operation": "regex", "pattern": "[x"}}],
            },
            "grader.graders.0.grader.pattern",
        ),
    ],
)
def test_bad_graders_are_refused_naming_the_field(grader: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_grader(grader)
    assert info.value.param == param, info.value.message


def test_graders_score_outputs_against_the_reference() -> None:
    equals = parse_grader({"type": "string_check"})
    assert equals.score(" Positive ", "positive") == 1.0 and equals.score("negative", "positive") == 0.0
    contains = parse_grader({"type": "string_check", "operation": "contains", "case_sensitive": True})
    assert contains.score("it is positive", "positive") == 1.0 and contains.score("Positive", "positive") == 0.0
    regex = parse_grader({"type": "string_check", "operation": "regex", "pattern": "^{reference}[.!]?$"})
    assert regex.score("positive!", "positive") == 1.0 and regex.score("positive?", "positive") == 0.0
    schema = parse_grader({"type": "json_schema", "schema": {"type": "object", "required": ["label"]}})
    assert schema.score('{"label": "x"}', "") == 1.0 and schema.score('{"x": 1}', "") == 0.0
    assert schema.score("not json", "") == 0.0
    length = parse_grader({"type": "length", "max_chars": 4})
    assert length.score("abcd", "") == 1.0 and length.score("abcdef", "") == 0.5 and length.score("a" * 9, "") == 0.0
    weighted = parse_grader(
        {
            "type": "weighted",
            "graders": [
                {"grader": {"type": "string_check"}, "weight": 3},
                {"grader": {"type": "length", "max_chars": 4}},
            ],
        }
    )
    assert weighted.score("positive", "positive") == pytest.approx(0.75)


# --- objective knobs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "hp", "param"),
    [
        ("sft", {"beta": 0.1}, "hyperparameters.beta"),
        ("dpo", {"num_generations": 4}, "hyperparameters.num_generations"),
        ("orpo", {"loss_type": "sigmoid"}, "hyperparameters.loss_type"),
        ("orpo", {"reference_model": "base"}, "hyperparameters.reference_model"),
        ("kto", {"label_smoothing": 0.1}, "hyperparameters.label_smoothing"),
        ("grpo", {"desirable_weight": 2.0}, "hyperparameters.desirable_weight"),
        ("dpo", {"packing": True}, "hyperparameters.packing"),
        ("dpo", {"loss_type": "kto"}, "hyperparameters.loss_type"),
        ("kto", {"loss_type": "ipo"}, "hyperparameters.loss_type"),
        ("dpo", {"loss_type": "ipo", "label_smoothing": 0.1}, "hyperparameters.label_smoothing"),
        ("dpo", {"reference_model": "init_adapter"}, "hyperparameters.reference_model"),
        ("grpo", {"batch_size": 6, "num_generations": 4}, "hyperparameters.num_generations"),
        ("dpo", {"distributed": {"strategy": "ddp"}}, "hyperparameters.distributed"),
    ],
)
def test_a_knob_that_does_not_apply_is_refused_naming_it(objective: str, hp: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as info:
        Hyperparameters(**hp).check_objective(objective, method="lora", init_adapter=None)
    assert info.value.param == param, info.value.message


def test_preference_objectives_train_lora_family_methods_only() -> None:
    with pytest.raises(InvalidInput) as info:
        Hyperparameters().check_objective("dpo", method="prompt_tuning", init_adapter=None)
    assert info.value.param == "method"
    for method in ("lora", "qlora", "dora"):
        Hyperparameters(use_rslora=True, beta=0.5).check_objective("dpo", method=method, init_adapter=None)


def test_knobs_default_to_trls_per_objective() -> None:
    hp = Hyperparameters(beta=0.3)
    assert hp.knob("dpo", "beta") == 0.3 and hp.knob("dpo", "loss_type") == "sigmoid"
    assert Hyperparameters().knob("grpo", "beta") == 0.0 and Hyperparameters().knob("kto", "loss_type") == "kto"
    spec = JobSpec.model_validate({"dataset_id": "ds-1"})
    assert spec.objective == "sft" and spec.init_adapter is None and spec.grader is None


# --- the CLI plot ------------------------------------------------------------------------------


def test_the_plot_shows_what_the_preference_trainer_logged(tmp_path: Any) -> None:
    from cli.plot import loss_curve, save_loss_plot

    job = {"id": "ftjob-1", "fine_tuned_model": "ft-dpo-1", "progress": {"total_steps": 4}}
    events = [
        {"type": "metrics", "step": s, "loss": 0.7 - 0.1 * s, "metrics": {"rewards/margins": 0.5 * s, "grad_norm": 1.0}}
        for s in (1, 2, 3, 4)
    ]
    report = {"metrics": [{"name": "preference_accuracy", "base": 0.4, "adapter": 0.9}]}
    curve = loss_curve(job, events, report)
    assert curve.metrics == {"rewards/margins": [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]}  # grad_norm is not plotted
    out = tmp_path / "plot.png"
    save_loss_plot(curve, out)
    assert out.stat().st_size > 10_000
