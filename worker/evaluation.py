"""The evaluation child process, and the one that derives or merges adapters.

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
from pathlib import Path
from typing import Any

from core.adapter_ops import (
    SCALABLE_METHODS,
    LoraScaler,
    check_scalable,
    derive_adapter,
    load_for_evaluation,
    merge_adapter,
)
from core.chat import prompt_text, split_prompt_reference
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
from core.logs import setup_logging
from core.models import (
    Adapter,
    AdapterOperation,
    AdapterStatus,
    Evaluation,
    EvaluationSample,
    OperationKind,
    WorkStatus,
)
from core.repository import adapters as adapters_repo
from core.repository import evaluations as evaluations_repo
from core.repository import leases
from core.repository.datasets import get_dataset
from core.settings import Settings, get_settings
from core.storage import Store, hash_dir, sha256_file
from worker.publishing import LeaseLost, publish_under_lease
from worker.training import EXIT_TRANSIENT, load_rows

log = logging.getLogger("tuneserve.evaluation")
# Teacher forcing sees the whole conversation; longer ones are cut (their loss covers what is left).
LOSS_MAX_LENGTH = 2048


def verified_adapter_dir(store: Store, adapter: Adapter) -> Path:
    """The adapter's directory, after checking every file against its recorded sha256 (docs/architecture.md, invariant 4)."""
    path = store.resolve(adapter.path)
    for name, digest in adapter.files.items():
        file = path / name
        if not file.is_file() or sha256_file(file) != digest:
            raise TrainingError(
                "adapter_corrupt", f"adapter {adapter.name!r}: {name} does not match its sha256", param="adapter"
            )
    return path


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
    import torch
    from transformers import AutoTokenizer

    from core.evaluation.inference import model_length, prompt_token_budget
    from core.evaluation.samples import clip

    settings, store = run.settings, Store(run.settings)
    started = time.monotonic()
    with session_scope(settings.database_url) as s:
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

    conversations = load_rows(store, dataset.path, ev.split)[: ev.max_examples or None]
    scales: list[float | None] = list(ev.scales) if adapter is not None and ev.scales else [None]
    run.write(n_examples=len(conversations), done_examples=0, results=[])

    if adapter is not None:
        try:
            check_scalable(adapter.method, ev.scales, param="scales")
        except InvalidInput as e:
            raise TrainingError("scale_unsupported", e.message, param=e.param) from None
    torch.manual_seed(0)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(settings.base_model))
    adapter_dir = verified_adapter_dir(store, adapter) if adapter is not None else None
    model = load_for_evaluation(settings.base_model, adapter.method if adapter else None, adapter_dir)
    # Only a sweep touches the weights: an adapter evaluated as trained needs no lora_B at all.
    scaler = LoraScaler(model) if any(s not in (None, 1.0) for s in scales) else None
    # A prompt longer than the model allows keeps its last tokens, leaving room for the answer.
    max_prompt_tokens = prompt_token_budget(
        model, tokenizer, max_model_len=settings.serving_max_model_len, max_new_tokens=ev.max_new_tokens
    )
    loss_max_length = min(LOSS_MAX_LENGTH, model_length(model, tokenizer, settings.serving_max_model_len))

    prompts = chat_prompts(tokenizer, conversations)
    references = [split_prompt_reference(m)[1] for m in conversations]
    text_metrics = [m for m in ev.metrics if m in TEXT_METRICS]
    wants_loss = any(m in LOSS_METRICS for m in ev.metrics)
    results: list[dict[str, Any]] = []
    for done_scales, scale in enumerate(scales):
        scale_started = time.monotonic()
        if scaler is not None and scale is not None:
            scaler.set_scale(scale)
        per_example: list[dict[str, float]] = [{} for _ in conversations]
        predictions = [""] * len(conversations)
        if text_metrics:
            base_done = done_scales * len(conversations)

            def progress(done: int, base_done: int = base_done) -> None:
                run.write(done_examples=base_done + done)

            tokens = generate_greedy(
                model,
                tokenizer,
                prompts,
                batch_size=ev.batch_size,
                max_new_tokens=ev.max_new_tokens,
                on_batch=progress,
                max_prompt_tokens=max_prompt_tokens,
            )
            predictions = [decode_prediction(tokenizer, t) for t in tokens]
            for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
                per_example[i].update(score_example(prediction, reference, text_metrics))
        aggregate = mean_scores(per_example)
        if wants_loss:
            losses = reference_losses(
                model, tokenizer, conversations, batch_size=ev.batch_size, max_length=loss_max_length
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
                    aggregate["perplexity"] = perplexity  # type: ignore[assignment]
        results.append(
            {
                "scale": scale,
                "metrics": aggregate,
                "n_examples": len(conversations),
                "seconds": round(time.monotonic() - scale_started, 3),
            }
        )
        # Prompt and reference are stored once, with the first scale (the API fills the other scales in from
        # them), and every text is cut to max_sample_chars: a sweep does not store the prompts again per scale.
        limit, first = settings.max_sample_chars, done_scales == 0
        samples = [
            EvaluationSample(
                evaluation_id=ev.id,
                scale=scale,
                example_index=i,
                prompt=clip(prompts[i], limit) if first else "",
                reference=clip(references[i], limit) if first else "",
                prediction=clip(predictions[i], limit),
                scores=per_example[i],
            )
            for i in range(len(conversations))
        ]
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


def derived_name(source: str, kind: OperationKind, scale: float, operation_id: str) -> str:
    """A new unique adapter name from the source, the scale and the operation (stable across retries)."""
    scale_text = f"{scale:g}".replace("+", "")
    tag = "x" if kind == OperationKind.derive else "merged-x"
    return f"{source[:80]}-{tag}{scale_text}-{operation_id.split('-', 1)[1][:8]}"


# Fixed prompts an imported adapter must change the base model's greedy answer to (at least one of them).
CANARY_PROMPTS = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "user", "content": "What is two plus two?"}],
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Translate to French: good morning"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Is the sky blue?"}],
]
CANARY_NEW_TOKENS = 16


def canary_verdict(settings: Settings, adapter_dir: Path) -> tuple[bool, str | None]:
    """(healthy, reason): greedy answers with and without the adapter on CANARY_PROMPTS must differ somewhere.

    An adapter that changes nothing (lora_B all zeros, a scale of 0, weights for modules the model never
    uses) would be served as if fine-tuned while answering exactly like the base model.
    """
    from transformers import AutoTokenizer

    from core.adapter_ops import load_adapter, load_base_model

    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    model = load_adapter(load_base_model(settings.base_model), adapter_dir)
    prompts = [prompt_text(tokenizer, messages) for messages in CANARY_PROMPTS]
    with model.disable_adapter():
        base = generate_greedy(model, tokenizer, prompts, batch_size=len(prompts), max_new_tokens=CANARY_NEW_TOKENS)
    tuned = generate_greedy(model, tokenizer, prompts, batch_size=len(prompts), max_new_tokens=CANARY_NEW_TOKENS)
    changed = sum(a != b for a, b in zip(base, tuned, strict=True))
    log.info("canary: the adapter changed %d of %d greedy answers", changed, len(prompts))
    if changed == 0:
        return False, (
            f"canary failed: its greedy output equals the base model's on all {len(prompts)} canary prompts "
            "(an adapter with no effect, e.g. lora_B all zeros)"
        )
    return True, None


def run_canary(settings: Settings, op: AdapterOperation, source: Adapter | None, owner: str) -> None:
    """Decide an imported adapter's health: ready and servable, or unhealthy with the reason (never served)."""
    if source is None or source.status != AdapterStatus.validating:
        raise TrainingError(
            "adapter_missing", f"adapter {op.source_adapter!r} is not waiting for a canary", param="name"
        )
    try:
        healthy, reason = canary_verdict(settings, verified_adapter_dir(Store(settings), source))
    except TrainingError as e:
        healthy, reason = False, f"canary failed: {e.message}"
    except Exception as e:
        log.warning("canary of %s could not load it", source.name, exc_info=True)
        healthy, reason = False, redact_paths(f"canary failed: it does not load: {type(e).__name__}: {str(e)[:300]}")
    with session_scope(settings.database_url) as s:
        if not leases.finish(s, AdapterOperation, op.id, owner=owner, status_name="succeeded", result_name=source.name):
            raise LeaseLost(op.id)
        adapters_repo.set_health(s, source.name, healthy=healthy, reason=reason)


def run_adapter_operation(settings: Settings, operation_id: str, owner: str) -> None:
    store = Store(settings)
    with session_scope(settings.database_url) as s:
        op = s.get(AdapterOperation, operation_id)
        assert op is not None
        source = adapters_repo.get_adapter_by_name(s, op.source_adapter)
    if op.kind == OperationKind.canary:
        run_canary(settings, op, source, owner)
        return
    if source is None or source.status != AdapterStatus.ready or source.method not in SCALABLE_METHODS:
        raise TrainingError(
            "adapter_missing", f"adapter {op.source_adapter!r} is not a ready LoRA adapter", param="name"
        )
    source_dir = verified_adapter_dir(store, source)
    name = derived_name(source.name, op.kind, op.scale, op.id)
    with store.staging_dir() as staged:
        if op.kind == OperationKind.derive:
            derive_adapter(source_dir, staged, op.scale)
        else:
            merge_adapter(settings.base_model, source_dir, staged, op.scale)
        files, size = hash_dir(staged)
        merged = op.kind == OperationKind.merge
        # One transaction under the operation's lease: publish, register, finish (invariant 4).
        with session_scope(settings.database_url) as s:
            relative = publish_under_lease(s, store, AdapterOperation, op.id, owner, staged, name)
            leases.finish(s, AdapterOperation, op.id, owner=owner, status_name="succeeded", result_name=name)
            _register_derived(s, op, source, name, relative, files, size, merged)


def _register_derived(
    s: Any,
    op: AdapterOperation,
    source: Adapter,
    name: str,
    relative: str,
    files: dict[str, str],
    size: int,
    merged: bool,
) -> None:
    adapters_repo.add_adapter(
        s,
        Adapter(
            name=name,
            tenant_id=op.tenant_id,
            job_id=None,
            base_model=source.base_model,
            method="merged" if merged else source.method,
            rank=source.rank,
            alpha=source.alpha,
            target_modules=list(source.target_modules),
            path=relative,
            files=files,
            size_bytes=size,
            status=AdapterStatus.ready,
            servable=False if merged else source.servable,
            servable_reason=(
                "a merged full model (base + scale x adapter): serve it as a base model, not as a LoRA adapter"
                if merged
                else source.servable_reason
            ),
            parent_name=source.name,
            scale=op.scale,
        ),
    )


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
