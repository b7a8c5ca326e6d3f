"""Metrics on (prediction, reference) text pairs; pure Python, shared by the worker and the tests."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

# Computed from generated text. "loss" and "perplexity" are computed by teacher forcing instead.
TEXT_METRICS = ("exact_match", "contains", "rouge1", "rouge2", "rougeL", "token_f1")
LOSS_METRICS = ("loss", "perplexity")
# On preference pairs: the share of pairs whose chosen answer has the higher log-probability under the model (margin
# > 0), and the mean margin (log p(chosen) - log p(rejected), summed over each answer's tokens). Scored whenever the
# split holds pairs: they are what a preference objective moves.
PREFERENCE_METRICS = ("preference_accuracy", "mean_margin")
# The evaluation's declarative grader (core.graders) on each prediction against its reference; a GRPO job's own.
GRADER_METRICS = ("grader",)
ALL_METRICS = TEXT_METRICS + LOSS_METRICS + PREFERENCE_METRICS + GRADER_METRICS
# Metrics where lower is better (the report's delta reads the other way).
LOWER_IS_BETTER = frozenset(LOSS_METRICS)

_WS = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Strip, lowercase, collapse runs of whitespace to one space."""
    return _WS.sub(" ", text.strip().lower())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """1 when the normalised reference appears in the normalised prediction (accuracy for label tasks)."""
    ref, pred = normalize(reference), normalize(prediction)
    return float(ref in pred) if ref else float(not pred)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the shared normalised tokens."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (rouge-score; its tokenizer keeps only lowercase ASCII letters and digits)."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: float(score.fmeasure) for name, score in scores.items()}


def _single(fn: Callable[[str, str], float]) -> Callable[[str, str], dict[str, float]]:
    return lambda p, r: {fn.__name__: fn(p, r)}


_SCORERS: dict[str, Callable[[str, str], dict[str, float]]] = {
    "exact_match": _single(exact_match),
    "contains": _single(contains),
    "token_f1": _single(token_f1),
    "rouge": rouge,
}


def score_example(prediction: str, reference: str, metrics: Sequence[str]) -> dict[str, float]:
    """The requested text metrics for one example."""
    wanted = set(metrics)
    scores: dict[str, float] = {}
    for group, scorer in _SCORERS.items():
        names = {"rouge1", "rouge2", "rougeL"} if group == "rouge" else {group}
        if names & wanted:
            scores.update({k: v for k, v in scorer(prediction, reference).items() if k in wanted})
    return scores


def mean_scores(per_example: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the examples that have it."""
    totals: dict[str, list[float]] = {}
    for scores in per_example:
        for name, value in scores.items():
            totals.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in totals.items()}
