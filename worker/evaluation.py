"""The evaluation child process, which also runs adapter operations (worker/adapter_operations.py).

Run as `python -m worker.evaluation evaluation EVALUATION_ID OWNER` or
`python -m worker.evaluation adapter_operation OPERATION_ID OWNER`. Like the training child it re-loads
its row, writes progress and results to SQL only while it holds the lease, and exits 0 once the row
is terminal (EXIT_TRANSIENT when another attempt may succeed).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from core.adapter_ops import (
    LoraScaler,
    check_scalable,
    load_for_evaluation,
)
from core.chat import split_prompt_reference
from core.db import session_scope
from core.errors import InvalidInput, TrainingError, redact_paths
from core.evaluation.inference import (
    chat_prompts,
    corpus_loss,
    decode_prediction,
    generate_greedy,
    prepare_tokenizer,
    reference_losses,
)
from core.evaluation.metrics import LOSS_METRICS, TEXT_METRICS, mean_scores, score_example
from core.graders import parse_grader, score
from core.logs import setup_logging
from core.models import (
    Adapter,
    AdapterOperation,
    AdapterStatus,
    Dataset,
    Evaluation,
    EvaluationSample,
    WorkStatus,
)
from core.repository import adapters as adapters_repo
from core.repository import evaluations as evaluations_repo
from core.repository import leases
from core.repository.datasets import get_dataset
from core.settings import Settings, get_settings
from core.storage import Store
from worker.adapter_operations import run_adapter_operation, verified_adapter_dir
from worker.publishing import LeaseLost
from worker.training import EXIT_TRANSIENT, load_records, load_rows

log = logging.getLogger("tuneserve.evaluation")
# Teacher forcing sees the whole conversation; longer ones are cut (their loss covers what is left).
LOSS_MAX_LENGTH = 2048


@dataclass
class EvaluationRun:
    settings: Settings
    evaluation_id: str
    owner: str

    def write(self, **values: Any) -> None:
        with session_scope(self.settings.database_url) as s:
            if not leases.update_owned(s, Evaluation, self.evaluation_id, owner=self.owner, **values):
                raise LeaseLost(self.evaluation_id)

    def write_scale(self, samples: list[EvaluationSample], **values: Any) -> None:
        with session_scope(self.settings.database_url) as s:
            if not leases.update_owned(s, Evaluation, self.evaluation_id, owner=self.owner, **values):
                raise LeaseLost(self.evaluation_id)
            evaluations_repo.add_samples(s, samples)


def evaluate(run: EvaluationRun) -> None:
    """Score the evaluation's split at each of its scales, storing results and samples as each scale ends."""
    settings, store = run.settings, Store(run.settings)
    started = time.monotonic()
    ev, dataset, adapter = _load_records(run)
    # The deployment's cap holds for rows written before it, or by an older API, too.
    limit = min(ev.max_examples or settings.max_evaluation_examples, settings.max_evaluation_examples)
    conversations = load_rows(store, dataset.path, ev.split)[:limit]
    # Preference pairs, in the order of their conversations (prompt + chosen): scored for preference accuracy too.
    records = load_records(store, dataset.path, ev.split)
    pairs = [r for r in records if isinstance(r, dict) and "chosen" in r][:limit]
    # Reinforcement rows' fields, in the order of their conversations: what an OpenAI grader's {{item.<field>}} reads.
    items = [r["item"] for r in records if isinstance(r, dict) and "item" in r][:limit] or None
    scales: list[float | None] = list(ev.scales) if adapter is not None and ev.scales else [None]
    run.write(n_examples=len(conversations), done_examples=0, results=[])
    if adapter is not None:
        try:
            check_scalable(adapter.method, ev.scales, param="scales")
        except InvalidInput as e:
            raise TrainingError("scale_unsupported", e.message, param=e.param) from None
    model, tokenizer, scaler = _load_model(settings, store, adapter, scales)
    budget = _budget(settings, ev, model, tokenizer)
    prompts = chat_prompts(tokenizer, conversations)
    references = [split_prompt_reference(m)[1] for m in conversations]
    results: list[dict[str, Any]] = []
    for done_scales, scale in enumerate(scales):
        scale_started = time.monotonic()
        if scaler is not None and scale is not None:
            scaler.set_scale(scale)
        before = done_scales * len(conversations)
        predictions, per_example, aggregate = _score_scale(
            run, ev, model, tokenizer, conversations, prompts, references, budget, done=before, items=items
        )
        if pairs:
            _score_preferences(ev, model, tokenizer, pairs, budget, per_example, aggregate)
        results.append(
            {
                "scale": scale,
                "metrics": aggregate,
                "n_examples": len(conversations),
                "seconds": round(time.monotonic() - scale_started, 3),
            }
        )
        samples = _samples(settings, ev, scale, prompts, references, predictions, per_example, first=done_scales == 0)
        run.write_scale(samples, results=list(results), done_examples=(done_scales + 1) * len(conversations))
    with session_scope(settings.database_url) as s:
        if not leases.finish(
            s,
            Evaluation,
            ev.id,
            owner=run.owner,
            status_name="succeeded",
            duration_seconds=round(time.monotonic() - started, 3),
        ):
            raise LeaseLost(ev.id)


def _load_records(run: EvaluationRun) -> tuple[Evaluation, Dataset, Adapter | None]:
    """The evaluation, its dataset and its adapter (None for the base model); an interrupted attempt's samples go."""
    with session_scope(run.settings.database_url) as s:
        ev = evaluations_repo.get_evaluation(s, run.evaluation_id)
        assert ev is not None
        dataset = get_dataset(s, ev.dataset_id)
        adapter = adapters_repo.get_adapter_by_name(s, ev.adapter_name) if ev.adapter_name else None
        # A retried attempt starts over: drop what an interrupted one wrote.
        evaluations_repo.delete_samples(s, ev.id)
    if dataset is None:
        raise TrainingError("dataset_missing", "the dataset no longer exists", param="dataset_id")
    if ev.adapter_name and (adapter is None or adapter.status != AdapterStatus.ready):
        raise TrainingError("adapter_missing", f"adapter {ev.adapter_name!r} is not ready", param="adapter")
    return ev, dataset, adapter


def _load_model(
    settings: Settings, store: Store, adapter: Adapter | None, scales: list[float | None]
) -> tuple[Any, Any, LoraScaler | None]:
    """(model, tokenizer, scaler): the base model with the adapter (its files checked), and a scaler for a sweep."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(settings.base_model))
    adapter_dir = verified_adapter_dir(store, adapter) if adapter is not None else None
    model = load_for_evaluation(settings.base_model, adapter.method if adapter else None, adapter_dir)
    # Only a sweep touches the weights: an adapter evaluated as trained needs no lora_B at all.
    scaler = LoraScaler(model) if any(s not in (None, 1.0) for s in scales) else None
    return model, tokenizer, scaler


@dataclass
class _Budget:
    """Token limits of one evaluation on this model."""

    max_prompt_tokens: int
    loss_max_length: int


def _budget(settings: Settings, ev: Evaluation, model: Any, tokenizer: Any) -> _Budget:
    from core.evaluation.inference import model_length, prompt_token_budget

    # A prompt longer than the model allows keeps its last tokens, leaving room for the answer.
    max_prompt_tokens = prompt_token_budget(
        model, tokenizer, max_model_len=settings.serving_max_model_len, max_new_tokens=ev.max_new_tokens
    )
    loss_max_length = min(LOSS_MAX_LENGTH, model_length(model, tokenizer, settings.serving_max_model_len))
    return _Budget(max_prompt_tokens=max_prompt_tokens, loss_max_length=loss_max_length)


def _score_scale(
    run: EvaluationRun,
    ev: Evaluation,
    model: Any,
    tokenizer: Any,
    conversations: list[Any],
    prompts: list[str],
    references: list[str],
    budget: _Budget,
    *,
    done: int,
    items: list[Any] | None = None,
) -> tuple[list[str], list[dict[str, float]], dict[str, Any]]:
    """(predictions, per-example scores, aggregate) at the model's current scale; `done` examples came before."""
    text_metrics = [m for m in ev.metrics if m in TEXT_METRICS]
    grader = parse_grader(ev.grader) if ev.grader else None
    per_example: list[dict[str, float]] = [{} for _ in conversations]
    predictions = [""] * len(conversations)
    if text_metrics or grader is not None:

        def progress(finished: int) -> None:
            run.write(done_examples=done + finished)

        tokens = generate_greedy(
            model,
            tokenizer,
            prompts,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            on_batch=progress,
            max_prompt_tokens=budget.max_prompt_tokens,
        )
        predictions = [decode_prediction(tokenizer, t) for t in tokens]
        for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            per_example[i].update(score_example(prediction, reference, text_metrics))
            if grader is not None:
                per_example[i]["grader"] = score(grader, prediction, reference, items[i] if items else None)
    aggregate: dict[str, Any] = mean_scores(per_example)
    if any(m in LOSS_METRICS for m in ev.metrics):
        _score_loss(ev, model, tokenizer, conversations, budget, per_example, aggregate)
    return predictions, per_example, aggregate


def _score_preferences(
    ev: Evaluation,
    model: Any,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    budget: _Budget,
    per_example: list[dict[str, float]],
    aggregate: dict[str, Any],
) -> None:
    """Preference accuracy (log p(chosen) > log p(rejected)) and the mean margin, per pair and over the split.

    Log-probabilities are the summed teacher-forced log-likelihoods of each answer's tokens after the same prompt
    (the chat template training uses), so the two answers of a pair are compared under identical conditioning.
    """

    def answered(pair: dict[str, Any], answer: str) -> list[dict[str, str]]:
        return [*pair["prompt"], {"role": "assistant", "content": pair[answer]}]

    chosen, rejected = (
        reference_losses(
            model,
            tokenizer,
            [answered(p, answer) for p in pairs],
            batch_size=ev.batch_size,
            max_length=budget.loss_max_length,
        )
        for answer in ("chosen", "rejected")
    )
    margins = [r.nll - c.nll for c, r in zip(chosen, rejected, strict=True)]
    for i, margin in enumerate(margins):
        per_example[i]["preference_accuracy"] = float(margin > 0)
        per_example[i]["mean_margin"] = margin
    aggregate["preference_accuracy"] = sum(m > 0 for m in margins) / len(margins)
    aggregate["mean_margin"] = sum(margins) / len(margins)


def _score_loss(
    ev: Evaluation,
    model: Any,
    tokenizer: Any,
    conversations: list[Any],
    budget: _Budget,
    per_example: list[dict[str, float]],
    aggregate: dict[str, Any],
) -> None:
    """Add loss and perplexity (whichever the evaluation asks for) to the per-example and aggregate scores."""
    losses = reference_losses(
        model, tokenizer, conversations, batch_size=ev.batch_size, max_length=budget.loss_max_length
    )
    for i, loss in enumerate(losses):
        if loss.mean is not None:
            if "loss" in ev.metrics:
                per_example[i]["loss"] = loss.mean
            if "perplexity" in ev.metrics:
                per_example[i]["perplexity"] = math.exp(min(loss.mean, 700.0))
    corpus, perplexity = corpus_loss(losses)
    if corpus is not None:
        # Token-weighted over the whole split, as training reports loss (not a mean of per-example means).
        if "loss" in ev.metrics:
            aggregate["loss"] = corpus
        if "perplexity" in ev.metrics:
            aggregate["perplexity"] = perplexity


def _samples(
    settings: Settings,
    ev: Evaluation,
    scale: float | None,
    prompts: list[str],
    references: list[str],
    predictions: list[str],
    per_example: list[dict[str, float]],
    *,
    first: bool,
) -> list[EvaluationSample]:
    """One scale's samples. Prompt and reference are stored once, with the first scale (the API fills the other
    scales in from them), and every text is cut to max_sample_chars: a sweep does not store the prompts again."""
    from core.evaluation.samples import clip

    limit = settings.max_sample_chars
    return [
        EvaluationSample(
            evaluation_id=ev.id,
            scale=scale,
            example_index=i,
            prompt=clip(prompts[i], limit) if first else "",
            reference=clip(references[i], limit) if first else "",
            prediction=clip(predictions[i], limit),
            scores=per_example[i],
        )
        for i in range(len(predictions))
    ]


def run(kind: str, record_id: str, owner: str) -> int:
    settings = get_settings()
    model: type[Evaluation] | type[AdapterOperation] = Evaluation if kind == "evaluation" else AdapterOperation
    with session_scope(settings.database_url) as s:
        row = leases.get(s, model, record_id)
        if row is None or row.lease_owner != owner or row.status != WorkStatus.running:
            return 0
    try:
        if kind == "evaluation":
            evaluate(EvaluationRun(settings, record_id, owner))
        else:
            run_adapter_operation(settings, record_id, owner)
        return 0
    except LeaseLost:
        log.warning("%s %s: lease lost, leaving it to its new owner", kind, record_id)
        return 0
    except TrainingError as e:
        if e.transient:
            return EXIT_TRANSIENT
        error = (e.code, e.message, e.param)
    except MemoryError as e:
        log.warning("%s %s: out of memory: %s", kind, record_id, e)
        return EXIT_TRANSIENT
    except Exception as e:
        log.exception("%s %s failed", kind, record_id)
        error = (f"{kind}_error", redact_paths(f"{type(e).__name__}: {e}"), None)
    with session_scope(settings.database_url) as s:
        leases.finish(s, model, record_id, owner=owner, status_name="failed", error=error)
    return 0


def main() -> None:
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3]))


if __name__ == "__main__":
    main()
