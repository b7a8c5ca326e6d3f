"""Storage that queued and running work will write, estimated at admission so the quota can refuse it up front.

A job, derive or merge writes its files long after it is admitted; checking only the bytes already stored let a
tenant one byte under its quota start 50 merges. Each active record instead reserves an estimate of what it will
write, and admission refuses the record whose reservation would take the tenant past its quota
(api/services/usage.py). The estimates are upper-leaning, from the base model's safetensors headers:

- a merge writes a copy of the base model: its safetensors bytes;
- a derive writes an adapter the size of its source;
- a full fine-tune writes the model (fp32 parameters) and keep_checkpoints checkpoints, each the parameters and
  AdamW's two moments (3 x the parameters);
- a LoRA (lora, qlora, dora) writes r x (in + out) fp32 parameters per targeted module, and checkpoints of those
  with their optimizer state; prompt, p- and prefix tuning are sized as a LoRA of rank num_virtual_tokens on the
  embeddings, a small upper bound.

A base model given as a hub name (no local files) reserves nothing beyond MIN_RESERVATION.

Evaluation samples are rows in SQL, one per example and scale, each text cut to max_sample_chars: they are counted
(and an active evaluation reserves the ones still to come) at an estimate per sample from its dataset's mean row
size and max_new_tokens, rather than by summing the texts' lengths on every admission.
"""

from __future__ import annotations

import math
from typing import Any

from core.model_info import UNSERVABLE_MODULES, weight_file_bytes, weight_shapes

FP32 = 4
OPTIMIZER_COPIES = 3  # a checkpoint holds the parameters and AdamW's exp_avg and exp_avg_sq
MIN_RESERVATION = 1024 * 1024  # configs, tokenizer files, trainer state: no record reserves less
LORA_METHODS = ("lora", "qlora", "dora")
DEFAULT_LORA_R = 8
DEFAULT_KEEP_CHECKPOINTS = 2
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _linear_shapes(base_model: str) -> list[tuple[str, int, int]]:
    """(module short name, out, in) of every 2-D weight LoRA could target."""
    return [
        (name.rsplit(".", 2)[-2], shape[0], shape[1])
        for name, shape in weight_shapes(base_model)
        if name.endswith(".weight") and len(shape) == 2 and "norm" not in name
    ]


def _lora_params(base_model: str, rank: int, targets: Any) -> int:
    if targets == "attention":
        targets = ATTENTION
    wanted = None if targets == "all-linear" or not isinstance(targets, list | tuple) else set(targets)
    return sum(
        rank * (fan_in + fan_out)
        for module, fan_out, fan_in in _linear_shapes(base_model)
        if module not in UNSERVABLE_MODULES and (wanted is None or module in wanted)
    )


def job_bytes(base_model: str, method: str, hyperparameters: dict[str, Any]) -> int:
    """What a job of this method and these hyperparameters may write: its result and its checkpoints."""
    keep = int(hyperparameters.get("keep_checkpoints") or DEFAULT_KEEP_CHECKPOINTS)
    if method == "full":
        params = sum(math.prod(shape) for _, shape in weight_shapes(base_model))
    elif method in LORA_METHODS:
        rank = int(hyperparameters.get("lora_r") or DEFAULT_LORA_R)
        params = _lora_params(base_model, rank, hyperparameters.get("target_modules", "all-linear"))
    else:
        hidden = max((shape[-1] for name, shape in weight_shapes(base_model) if "embed" in name), default=0)
        params = int(hyperparameters.get("num_virtual_tokens") or 16) * hidden * 2
    return max(MIN_RESERVATION, params * FP32 * (1 + OPTIMIZER_COPIES * keep))


def merge_bytes(base_model: str) -> int:
    return max(MIN_RESERVATION, weight_file_bytes(base_model))


def derive_bytes(source_adapter_bytes: int) -> int:
    return max(MIN_RESERVATION, source_adapter_bytes)


SAMPLE_ROW_OVERHEAD = 256  # ids, scale, scores JSON and the row's own overhead
CHARS_PER_TOKEN = 8  # a generous bound on a prediction's characters per new token


def sample_bytes(*, dataset_bytes: int, dataset_rows: int, max_new_tokens: int, max_sample_chars: int) -> int:
    """The estimated size of one stored evaluation sample: its prompt and reference (each about a dataset row, at
    most max_sample_chars), its prediction (max_new_tokens tokens, at most max_sample_chars) and the row."""
    row = dataset_bytes // max(1, dataset_rows)
    prediction = max_new_tokens * CHARS_PER_TOKEN
    return 2 * min(max_sample_chars, row) + min(max_sample_chars, prediction) + SAMPLE_ROW_OVERHEAD
