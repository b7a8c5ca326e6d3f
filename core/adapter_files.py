"""A PEFT LoRA adapter's files, checked without torch: what vLLM can serve (config) and what fits the base
model (tensor shapes from safetensors headers). Serving runs these before every load; imports run them first."""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path
from typing import Any

from core import strict_json

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# vLLM serves LoRA on the transformer's linear layers only.
UNSERVABLE_MODULES = ("lm_head", "embed_tokens", "wte", "word_embeddings")
PEFT_PREFIX = "base_model.model."


# Base models' own headers can be large (one entry per tensor); imports pass the smaller max_safetensors_header_bytes.
DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_shapes(path: Path, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, without reading the tensors (or importing torch).

    The header's length is checked against max_header_bytes before it is read, and its JSON must have the
    safetensors layout (an object of {dtype, shape: [n, ...], data_offsets: [begin, end]}): anything else is a
    ValueError naming the tensor, never a KeyError or TypeError.
    """
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is not a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > max_header_bytes:
            raise ValueError(
                f"{path.name} declares a safetensors header of {header_len} bytes; the limit is {max_header_bytes} "
                "(TUNESERVE_MAX_SAFETENSORS_HEADER_BYTES)"
            )
        data = f.read(header_len)
    if len(data) != header_len:
        raise ValueError(f"{path.name} is truncated (its header is cut short)")
    try:
        header = strict_json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path.name}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the safetensors header must be a JSON object")
    data_size = path.stat().st_size - 8 - header_len
    shapes: dict[str, list[int]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = _tensor_layout(path.name, name, meta)
        if offsets[1] > data_size:
            raise ValueError(f"{path.name} is truncated")
        shapes[name] = shape
    return shapes


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_layout(file: str, name: str, meta: object) -> tuple[list[int], list[int]]:
    """A header entry's shape and data offsets, checked to be what the safetensors format says."""
    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str):
        raise ValueError(f"{file}: tensor {name!r} must be an object with dtype, shape and data_offsets")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise ValueError(f"{file}: tensor {name!r} has an invalid shape {shape!r:.100}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(n) for n in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{file}: tensor {name!r} has invalid data_offsets {offsets!r:.100} (want [begin, end])")
    return list(shape), list(offsets)


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


def _rank(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{field} must be a whole number; got {value!r:.100}")
    return value


def _number(field: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number; got {value!r:.100}")
    return float(value)


def _pattern(field: str, value: object) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: absent or an object of module name -> number."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be an object of module name -> value; got {type(value).__name__}")
    return value


def check_adapter_config(config: dict[str, Any], *, max_rank: int) -> None:
    """Raise ValueError naming what vLLM cannot serve in this PEFT adapter_config (or what is not a valid one).

    Every field used later is type-checked here, so nothing downstream meets a string where a number belongs.
    """
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type is {config.get('peft_type')!r:.100}; only LORA adapters can be served")
    rank_pattern = _pattern("rank_pattern", config.get("rank_pattern"))
    ranks = [_rank("r", config.get("r") or 0), *(_rank(f"rank_pattern.{k}", r) for k, r in rank_pattern.items())]
    if max(ranks) > max_rank:
        raise ValueError(f"rank {max(ranks)} is above this server's max_lora_rank {max_rank}")
    if min(ranks) < 1:
        raise ValueError("rank r must be at least 1")
    if config.get("lora_alpha") is not None:
        _number("lora_alpha", config["lora_alpha"])
    for module, alpha in _pattern("alpha_pattern", config.get("alpha_pattern")).items():
        _number(f"alpha_pattern.{module}", alpha)
    targets = config.get("target_modules")
    if (
        targets is not None
        and not isinstance(targets, str)
        and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise ValueError("target_modules must be a string or a list of strings")
    if config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora) cannot be served by vLLM")
    if config.get("modules_to_save"):
        raise ValueError("adapters with modules_to_save cannot be served by vLLM")
    for target in _targets(config):
        if any(m in target for m in UNSERVABLE_MODULES):
            raise ValueError(f"target module {target!r:.100}: LoRA on lm_head or embeddings cannot be served by vLLM")


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
