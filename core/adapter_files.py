"""A PEFT LoRA adapter's files, checked without torch: what vLLM can serve (config) and what fits the base
model (tensor shapes from safetensors headers). Serving runs these before every load; imports run them first."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# vLLM serves LoRA on the transformer's linear layers only.
UNSERVABLE_MODULES = ("lm_head", "embed_tokens", "wte", "word_embeddings")
PEFT_PREFIX = "base_model.model."


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, without reading the tensors (or importing torch)."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is not a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > 100 * 1024 * 1024:
            raise ValueError(f"{path.name} has an implausible safetensors header")
        header = json.loads(f.read(header_len))
    size = path.stat().st_size
    shapes: dict[str, list[int]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if 8 + header_len + meta["data_offsets"][1] > size:
            raise ValueError(f"{path.name} is truncated")
        shapes[name] = list(meta["shape"])
    return shapes


def base_weight_shapes(base_model: str) -> dict[str, list[int]]:
    """Shapes of the base model's weights (local dir or cached hub snapshot); empty when unavailable."""
    directory = Path(base_model)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(base_model, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:  # noqa: BLE001 - without local weights, vLLM's own checks are all there is
            log.warning("no local safetensors for %s: adapter shapes are not checked before loading", base_model)
            return {}
    shapes: dict[str, list[int]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        shapes.update(safetensors_shapes(file))
    return shapes


def _targets(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else [str(t) for t in targets]


def check_adapter_config(config: dict[str, Any], *, max_rank: int) -> None:
    """Raise ValueError naming what vLLM cannot serve in this PEFT adapter_config."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters can be served")
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise ValueError(f"rank {max(ranks)} is above this server's max_lora_rank {max_rank}")
    if min(ranks) < 1:
        raise ValueError("rank r must be at least 1")
    if config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora) cannot be served by vLLM")
    if config.get("modules_to_save"):
        raise ValueError("adapters with modules_to_save cannot be served by vLLM")
    for target in _targets(config):
        if any(m in target for m in UNSERVABLE_MODULES):
            raise ValueError(f"target module {target!r}: LoRA on lm_head or embeddings cannot be served by vLLM")


def check_adapter_shapes(weights: dict[str, list[int]], base: dict[str, list[int]], *, max_rank: int) -> None:
    """Every lora_A is (r, in) and lora_B is (out, r) for a linear layer the base model has."""
    if not weights:
        raise ValueError(f"{ADAPTER_WEIGHTS} holds no tensors")
    for key, shape in weights.items():
        if "lora_embedding" in key:
            raise ValueError(f"{key}: embedding LoRA cannot be served by vLLM")
        module, sep, part = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise ValueError(f"{key}: not a LoRA A/B weight")
        if len(shape) != 2:
            raise ValueError(f"{key}: expected a matrix, found shape {shape}")
        if not base:
            continue
        base_shape = base.get(f"{module}.weight")
        if base_shape is None:
            raise ValueError(f"{key}: the base model has no layer {module!r}")
        out_features, in_features = base_shape
        rank = shape[0] if part == "A.weight" else shape[1]
        expected = [rank, in_features] if part == "A.weight" else [out_features, rank]
        if shape != expected or not 1 <= rank <= max_rank:
            raise ValueError(f"{key}: shape {shape} does not fit layer {module} of shape {base_shape}")
