"""OpenAI's graders: the math of each (no stack), and /v1/fine_tuning/alpha/graders validate and run through the
official `openai` client, refusals included (a python grader, a `$ref`, an unknown field, a calculate_output that is
not arithmetic) — each a 400 naming the field, never a 5xx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import openai
import pytest

from api.services.openai_fine_tuning import BadRequest
from api.services.openai_graders import GraderContext, native_grader_from_openai, run_grader
from core.dataset_formats import OBJECTIVES_BY_FORMAT, DatasetFormat, DatasetLineError, parse_jsonl
from core.errors import InvalidInput
from core.graders import grade_openai, parse_grader, parse_openai_grader, score, text_similarity
from tests.support.aio import run_async
from tests.support.http import api_server
from tests.support.stack import Stack
from worker.objectives import reward_function, trl_rows

OUTPUT = "{{sample.output_text}}"


def _check(operation: str, reference: str = "{{item.answer}}") -> dict[str, Any]:
    return {"type": "string_check", "name": "check", "input": OUTPUT, "reference": reference, "operation": operation}


def _similarity(metric: str) -> dict[str, Any]:
    return {
        "type": "text_similarity",
        "name": "similar",
        "input": OUTPUT,
        "reference": "{{item.answer}}",
        "evaluation_metric": metric,
    }


def _multi(formula: str) -> dict[str, Any]:
    return {
        "type": "multi",
        "name": "combined",
        "graders": {"exact": _check("eq"), "close": _similarity("fuzzy_match")},
        "calculate_output": formula,
    }


def _reward(grader: dict[str, Any], sample: str, item: Any) -> float:
    return grade_openai(parse_openai_grader(grader), sample, item).reward


@pytest.mark.parametrize(
    ("operation", "sample", "answer", "expected"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "It is Paris.", "Paris", 1.0),
        ("like", "It is paris.", "Paris", 0.0),
        ("ilike", "IT IS PARIS.", "Paris", 1.0),
        ("ilike", "Lyon", "Paris", 0.0),
    ],
)
def test_string_check_operations(operation: str, sample: str, answer: str, expected: float) -> None:
    assert _reward(_check(operation), sample, {"answer": answer}) == expected


def test_templates_read_the_sample_its_json_and_nested_item_fields() -> None:
    nested = _check("eq", "{{item.expected.city}}-{{item.list.1}}")
    nested["input"] = "{{sample.output_json.city}}-{{sample.output_json.n}}"
    assert _reward(nested, '{"city": "Paris", "n": 2}', {"expected": {"city": "Paris"}, "list": [1, 2]}) == 1.0
    # A field the item lacks, or a sample that is not JSON: no reward, and the run says which error it was.
    missing = grade_openai(parse_openai_grader(_check("eq")), "Paris", {"other": 1})
    assert (missing.reward, missing.errors) == (0.0, ["invalid_variable_error"])
    assert _reward(nested, "not json", {}) == 0.0


@pytest.mark.parametrize(
    "metric",
    ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"],
)
def test_text_similarity_is_one_for_the_same_text_and_ordered_by_overlap(metric: str) -> None:
    reference = "the quick brown fox jumps over the lazy dog near the river bank"
    near = "the quick brown fox jumps over the lazy cat near the river bank"
    far = "completely unrelated words appear here instead"
    same, close, distant = (text_similarity(metric, t, reference) for t in (reference, near, far))
    assert same == pytest.approx(1.0, abs=0.01)  # METEOR's fragmentation penalty keeps it just under 1
    assert same >= close > distant >= 0.0


def test_multi_calculate_output_over_named_graders() -> None:
    item = {"answer": "Paris"}
    assert _reward(_multi("0.5 * exact + 0.5 * close"), "Paris", item) == 1.0
    assert _reward(_multi("min(exact, close) - abs(-1) + 2 ^ 2 + sqrt(4) / 2"), "Paris", item) == pytest.approx(5.0)
    partial = grade_openai(parse_openai_grader(_multi("exact + close")), "Pariss", item)
    assert partial.scores["exact"] == 0.0 and 0.8 < partial.scores["close"] < 1.0
    # A formula with no value for these scores (a division by zero, an overflow) is no reward, not a crash.
    for formula in ("exact / (exact - exact)", "9 ** 9 ** 9", "exp(1000)", "log(exact - 1)"):
        result = grade_openai(parse_openai_grader(_multi(formula)), "Paris", item)
        assert (result.reward, result.errors) == (0.0, ["formula_error"])


@pytest.mark.parametrize(
    ("grader", "param", "says"),
    [
        ({"type": "python", "name": "p", "source": "import os"}, "grader.type", "no sandbox"),
        (
            {"type": "multi", "name": "m", "graders": {"p": {"type": "python", "name": "p", "source": "1"}}},
            "grader.graders.p.type",
            "no sandbox",
        ),
        ({"type": "score_model", "name": "s", "model": "x", "input": []}, "grader.type", "graders/validate and /run"),
        ({"type": "label_model", "name": "s", "model": "x", "input": []}, "grader.type", "graders/validate and /run"),
        ({**_check("eq"), "$ref": "http://127.0.0.1:1/x"}, "grader.$ref", "not a field"),
        ({**_check("eq"), "source": "print(1)"}, "grader.source", "not a field"),
        ({"type": "regex", "name": "r"}, "grader.type", "does not match"),
        (_check("contains"), "grader.operation", "eq"),
        (_check("eq", "{{__import__('os')}}"), "grader.reference", "not sample.output_text"),
        (_check("eq", "{{item.answer"), "grader.reference", "no closing"),
        (_similarity("cosine"), "grader.evaluation_metric", "embeddings"),
        (_multi("__import__('os').system('id')"), "grader.calculate_output", "__import__"),
        (_multi("exact.__class__"), "grader.calculate_output", "Attribute"),
        (_multi("[x for x in ()]"), "grader.calculate_output", "not arithmetic"),
        (_multi("exact if close else 0"), "grader.calculate_output", "not arithmetic"),
        (_multi("'a' * 9"), "grader.calculate_output", "not a number"),
        (_multi("unknown + 1"), "grader.calculate_output", "neither a grader name"),
        (_multi("max()"), "grader.calculate_output", "no plain arguments"),
        (_multi("(" * 300 + "1" + ")" * 300), "grader.calculate_output", "at most 512"),
        (_multi("(" * 250 + "1" + ")" * 250), "grader.calculate_output", "not an arithmetic expression"),
        (_multi("+".join(["1"] * 150)), "grader.calculate_output", "more than 200 terms"),
        (_multi("exact +"), "grader.calculate_output", "not an arithmetic expression"),
        ({**_check("eq"), "name": "\ud800"}, "grader.name", "unpaired surrogate"),
        (_check("eq", "{{item.\udfff}}"), "grader.reference", "unpaired surrogate"),
    ],
)
def test_refusals_name_the_field(grader: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(InvalidInput) as native:
        parse_openai_grader(grader)
    assert native.value.param == param and says in native.value.message
    with pytest.raises(BadRequest) as openai_shape:  # what /v1/fine_tuning answers for method.reinforcement.grader
        native_grader_from_openai(grader, "method.reinforcement.grader")
    assert openai_shape.value.status_code == 400
    assert openai_shape.value.param == param.replace("grader", "method.reinforcement.grader", 1)


def test_a_run_body_that_utf8_cannot_hold_is_a_400_naming_the_field() -> None:
    for body, param in (
        ({"grader": _check("eq"), "model_sample": "a", "item": {"answer": "\ud800"}}, "item.answer"),
        ({"grader": _check("eq"), "model_sample": "\ud800"}, "model_sample"),
        ({"grader": _check("eq"), "model_sample": "a", "\ud800": 1}, "\\ud800"),
    ):
        with pytest.raises(BadRequest) as refused:
            run_async(run_grader(body, cast(GraderContext, None)))  # refused before the judge's context is read
        assert (refused.value.status_code, refused.value.param) == (400, param)


def _judge(kind: str, model: str = "judge", **fields: Any) -> dict[str, Any]:
    question = [
        {"role": "developer", "content": "Grade the answer."},
        {"role": "user", "content": [{"type": "input_text", "text": "Q: {{item.q}} A: {{sample.output_text}}"}]},
    ]
    if kind == "label_model":
        fields = {"labels": ["right", "wrong"], "passing_labels": ["right"], **fields}
    return {"type": kind, "name": "judge", "model": model, "input": question, **fields}


def test_model_graders_parse_and_read_the_judges_structured_answer() -> None:
    score_model = parse_openai_grader(_judge("score_model", range=[0, 10]), model_graders=True)
    assert score_model.judge_messages("4", {"q": "2+2?"}) == [
        {"role": "system", "content": "Grade the answer."},
        {"role": "user", "content": "Q: 2+2? A: 4"},
    ]
    assert score_model.response_format()["json_schema"]["schema"]["properties"]["result"]["maximum"] == 10
    assert [score_model.reward_of(t) for t in ('{"result": 7.5}', '{"result": 99}', "7", '{"result": "x"}')] == [
        7.5,
        10.0,
        None,
        None,
    ]
    label_model = parse_openai_grader(_judge("label_model"), model_graders=True)
    assert [label_model.reward_of(t) for t in ('{"result": "right"}', '{"result": "wrong"}', '{"result": "?"}')] == [
        1.0,
        0.0,
        None,
    ]
    image = _judge("score_model")
    image["input"][1]["content"] = [{"type": "input_image", "image_url": "http://127.0.0.1/x.png"}]
    for grader, param in (
        (_judge("label_model", passing_labels=["maybe"]), "grader.passing_labels"),
        (_judge("score_model", range=[1, 0]), "grader.range"),
        (
            _judge("score_model", sampling_params={"max_completions_tokens": 10, "logit_bias": {}}),
            "grader.sampling_params.logit_bias",
        ),
        (image, "grader.input.1.content.0.type"),
        ({**_multi("exact"), "graders": {"exact": _judge("score_model")}}, "grader.graders.exact.type"),
    ):
        with pytest.raises(InvalidInput) as refused:
            parse_openai_grader(grader, model_graders=True)
        assert refused.value.param == param, refused.value.message


def test_native_grader_of_an_openai_one_scores_the_row_fields() -> None:
    native = native_grader_from_openai(_multi("exact"), "grader")
    assert native["type"] == "openai" and native["grader"]["graders"]["exact"]["operation"] == "eq"
    grader = parse_grader(native)  # what a GRPO job stores and its reward parses again in the training child
    assert score(grader, "Paris", "unused", {"answer": "Paris"}) == 1.0
    # Without the row's fields (an evaluation), the reference column is item.reference.
    assert score(parse_grader(native_grader_from_openai(_check("eq", "{{item.reference}}"), "g")), "a", "a") == 1.0


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with api_server(stack.settings) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=stack.api_key, max_retries=0)


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_validate_and_run_with_the_openai_client(client: openai.OpenAI) -> None:
    # Any: the client types a grader as its TypedDicts (and a multi's graders as one grader), ours are plain dicts.
    graders: Any = client.fine_tuning.alpha.graders
    for grader in (_check("ilike"), _similarity("rouge_l"), _multi("0.7 * exact + 0.3 * close")):
        validated = graders.validate(grader=grader)
        assert validated.grader is not None and validated.grader.to_dict() == grader

    ran = graders.run(grader=_check("ilike"), model_sample="It is PARIS", item={"answer": "paris"})
    assert ran.reward == 1.0 and ran.metadata.name == "check" and ran.metadata.type == "string_check"
    assert not any(v for k, v in ran.metadata.errors.to_dict().items() if k.endswith("_error"))
    multi = graders.run(grader=_multi("0.5 * exact + 0.5 * close"), model_sample="Pariss", item={"answer": "Paris"})
    assert set(multi.sub_rewards) == {"exact", "close"} and 0.4 < multi.reward < 0.5
    missing = graders.run(grader=_check("eq"), model_sample="Paris", item={})
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error

    refusals = [
        (lambda: graders.validate(grader={"type": "python", "name": "p", "source": "1"}), "grader.type"),
        (lambda: graders.validate(grader={**_check("eq"), "$ref": "file:///etc/passwd"}), "grader.$ref"),
        (lambda: graders.run(grader=_multi("__import__('os')"), model_sample="x"), "grader.calculate_output"),
        (lambda: graders.validate(grader=_check("eq"), extra_body={"sandbox": True}), "sandbox"),
        (lambda: graders.run(grader=_check("eq"), model_sample=3), "model_sample"),
    ]
    for call, param in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.status_code == 400 and refused.value.param == param, refused.value.message


RFT_ROWS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris", "meta": {"n": 1}},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"},
]


def _rft_file(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_rft_rows_end_on_a_user_turn_and_their_fields_reach_the_grpo_reward() -> None:
    parsed = parse_jsonl(_rft_file(*RFT_ROWS), max_rows=10, max_line_bytes=10_000)
    assert parsed.format is DatasetFormat.REINFORCEMENT and OBJECTIVES_BY_FORMAT["reinforcement"] == ("grpo",)
    assert parsed.rows[0] == {"prompt": RFT_ROWS[0]["messages"], "item": {"answer": "Paris", "meta": {"n": 1}}}
    # The reward TRL calls in the GRPO child, on the columns trl_rows gives it (the same native grader JSON).
    rows = trl_rows("grpo", parsed.rows)
    assert rows[1]["prompt"][-1] == {"role": "user", "content": "2+2?"}
    reward = reward_function(native_grader_from_openai(_check("eq"), "grader"))
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    completions = [[{"role": "assistant", "content": text}] for text in ("Paris", "5")]
    assert reward(completions=completions, prompts=[r["prompt"] for r in rows], **columns) == [1.0, 0.0]


def test_rft_row_refusals_name_the_line_and_field() -> None:
    bad_turn = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": "y"}
    with pytest.raises(DatasetLineError) as ended_on_assistant:
        parse_jsonl(_rft_file(RFT_ROWS[0], bad_turn), max_rows=10, max_line_bytes=10_000)
    assert (ended_on_assistant.value.line, ended_on_assistant.value.field) == (2, "messages[1].role")
    with pytest.raises(DatasetLineError) as no_messages:
        parse_jsonl(_rft_file(RFT_ROWS[0], {"answer": "y"}), max_rows=10, max_line_bytes=10_000)
    assert (no_messages.value.line, no_messages.value.field) == (2, "messages")


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_grpo_job_rewards_with_an_openai_grader_over_the_rows_fields(stack: Stack) -> None:
    """The native GRPO path (what method.type reinforcement becomes) on an RFT file, one step on the tiny model.

    The grader's `ne` against an answer no completion gives scores 1 only where the row's `answer` reached it (a
    missing item field scores 0), so a mean reward of 1 says every row's fields were there; in training, and in the
    before/after evaluation on the held-out rows too.
    """
    rows = [{**row, "answer": "no completion says this"} for row in RFT_ROWS * 2]
    files = {"file": ("rft.jsonl", _rft_file(*rows)), "test_file": ("test.jsonl", _rft_file(*rows[:2]))}
    created = stack.client.post("/datasets", files=files)
    assert created.status_code == 201, created.text
    assert (created.json()["format"], created.json()["objectives"]) == ("reinforcement", ["grpo"])
    body = {
        "dataset_id": created.json()["id"],
        "objective": "grpo",
        "grader": native_grader_from_openai(_check("ne"), "grader"),
        "hyperparameters": {"max_steps": 1, "batch_size": 4, "num_generations": 2, "max_completion_length": 4},
        "evaluation": {"max_new_tokens": 4, "batch_size": 2, "metrics": ["exact_match"]},
    }
    response = stack.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["grader"] == body["grader"]
    job = stack.wait_for_job(response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    events = stack.client.get(f"/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    metrics = [e["metrics"] for e in events if e["type"] == "metrics" and e["metrics"]]
    assert metrics and all(m["rewards/check/mean"] == 1.0 for m in metrics), metrics
    deadline = time.monotonic() + 300
    while stack.client.get(f"/jobs/{job['id']}").json()["evaluation"]["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, "the job's evaluation did not finish"
        time.sleep(0.5)
    report = stack.client.get(f"/jobs/{job['id']}/report").json()
    grader = next(m for m in report["metrics"] if m["name"] == "grader")
    assert (grader["base"], grader["adapter"]) == (1.0, 1.0), report
    # An SFT job cannot train on rows with no answer: a 422 naming the objective.
    sft = stack.client.post("/jobs", json={"dataset_id": created.json()["id"], "objective": "sft"})
    assert (sft.status_code, sft.json()["error"]["param"]) == (422, "objective"), sft.text


def test_model_graders_are_judged_by_a_model_this_deployment_serves(serving_stack: Stack) -> None:
    """score_model and label_model through the real serving process: the base judges under structured output, so
    even the tiny model's answer parses; a model the deployment does not serve is a 404 naming grader.model."""
    with api_server(serving_stack.settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=serving_stack.api_key, max_retries=0)
        graders: Any = client.fine_tuning.alpha.graders
        base = serving_stack.settings.served_model_name
        sampling = {"max_completions_tokens": 24, "temperature": 0, "seed": 1}
        for kind, rewards in (("score_model", None), ("label_model", {0.0, 1.0})):
            grader = _judge(kind, base, sampling_params=sampling)
            assert graders.validate(grader=grader).grader.to_dict(warnings=False)["model"] == base
            ran = graders.run(grader=grader, model_sample="4", item={"q": "2+2?"})
            errors = ran.metadata.errors
            assert not errors.model_grader_server_error, errors.model_grader_server_error_details
            if not errors.model_grader_parse_error:  # 24 tokens may cut a guided answer short; then it says so
                assert 0.0 <= ran.reward <= 1.0 and (rewards is None or ran.reward in rewards)
            assert ran.metadata.token_usage and base in ran.model_grader_token_usage_per_model
        for call in (
            lambda: graders.validate(grader=_judge("score_model", "not-served")),
            lambda: graders.run(grader=_judge("label_model", "ft:other:tenant:x:ftjob-1"), model_sample="4"),
        ):
            with pytest.raises(openai.NotFoundError) as refused:
                call()
            assert refused.value.param == "grader.model"
