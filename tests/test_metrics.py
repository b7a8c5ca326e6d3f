"""Each metric on hand-made cases whose answers can be worked out by hand."""

from __future__ import annotations

import math
from typing import get_args

import pytest

from core.evaluation.inference import ReferenceLoss, corpus_loss
from core.evaluation.metrics import (
    ALL_METRICS,
    contains,
    exact_match,
    mean_scores,
    normalize,
    rouge,
    score_example,
    token_f1,
)


def test_normalize_strips_lowercases_and_collapses_whitespace() -> None:
    assert normalize("  Hello \t  World\n") == "hello world"


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("positive", "positive", 1.0),
        ("  Positive\n", "positive", 1.0),
        ("new   york", "New York", 1.0),
        ("positive.", "positive", 0.0),  # punctuation counts: exact means exact
        ("negative", "positive", 0.0),
        ("", "positive", 0.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The answer is Positive.", "positive", 1.0),
        ("positive", "positive", 1.0),
        ("negative", "positive", 0.0),
        ("pos", "positive", 0.0),  # the reference must appear, not the other way round
    ],
)
def test_contains(prediction: str, reference: str, expected: float) -> None:
    assert contains(prediction, reference) == expected


def test_token_f1_squad_style() -> None:
    # SQuAD normalisation drops case, punctuation and articles: "the cat sat" vs "a cat sat on the mat"
    # -> pred [cat, sat], ref [cat, sat, on, mat]: precision 1, recall 1/2, F1 2/3.
    assert token_f1("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert token_f1("Cat, sat!", "the cat sat") == 1.0
    assert token_f1("dog", "cat") == 0.0
    # A repeated token matches only as often as the reference has it: common 1, P 1/2, R 1.
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_rouge_by_hand() -> None:
    # ref "the cat sat on the mat" (6 tokens), pred "the cat sat" (3 tokens).
    scores = rouge("the cat sat", "the cat sat on the mat")
    # ROUGE-1: overlap 3 -> P 3/3, R 3/6 -> F 2/3. ROUGE-2: bigrams pred 2, ref 5, overlap 2 -> P 1, R 2/5.
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)
    # ROUGE-L: LCS 3 -> same as ROUGE-1 here.
    assert scores["rougeL"] == pytest.approx(2 / 3)
    # Word order matters for L but not for 1: "mat the on sat cat the" vs the reference.
    shuffled = rouge("mat the on sat cat the", "the cat sat on the mat")
    # LCS is "the on the" (3 of 6) -> F 1/2; no bigram survives the shuffle.
    assert (
        shuffled["rouge1"] == pytest.approx(1.0)
        and shuffled["rougeL"] == pytest.approx(0.5)
        and shuffled["rouge2"] == 0.0
    )


def test_score_example_returns_only_the_requested_metrics() -> None:
    scores = score_example("Positive", "positive", ["exact_match", "rougeL"])
    assert scores == {"exact_match": 1.0, "rougeL": 1.0}


def test_mean_scores() -> None:
    assert mean_scores([{"exact_match": 1.0}, {"exact_match": 0.0}, {"exact_match": 1.0}]) == {
        "exact_match": pytest.approx(2 / 3)
    }


def test_corpus_loss_is_token_weighted_and_perplexity_its_exp() -> None:
    loss, perplexity = corpus_loss([ReferenceLoss(nll=3.0, tokens=1), ReferenceLoss(nll=3.0, tokens=3)])
    assert loss == pytest.approx(6.0 / 4) and perplexity == pytest.approx(math.exp(1.5))
    assert corpus_loss([ReferenceLoss(0.0, 0)]) == (None, None)


def test_the_request_schema_offers_exactly_the_metrics_there_are() -> None:
    from core.evaluation.spec import DEFAULT_METRICS, MetricName

    assert get_args(MetricName) == ALL_METRICS and tuple(DEFAULT_METRICS) == ALL_METRICS
