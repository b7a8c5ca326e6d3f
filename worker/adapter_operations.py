"""Adapter operations, run in the worker's child process: derive a scaled adapter, merge one into a full model,
or decide an imported adapter's health with its canary.

The child is `python -m worker.evaluation adapter_operation OPERATION_ID OWNER` (worker/tasks.py KINDS), which
calls run_adapter_operation; like every child it writes only while it holds the operation's lease.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.adapter_ops import SCALABLE_METHODS, derive_adapter, merge_adapter
from core.chat import prompt_text
from core.db import session_scope
from core.errors import TrainingError, redact_paths
from core.evaluation.inference import generate_greedy
from core.models import Adapter, AdapterOperation, AdapterStatus, OperationKind
from core.repository import adapters as adapters_repo
from core.repository import leases
from core.settings import Settings
from core.storage import Store, hash_dir, sha256_file
from worker.publishing import LeaseLost, publish_under_lease

log = logging.getLogger("tuneserve.adapter_operations")


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
