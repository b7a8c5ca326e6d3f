"""A PEFT LoRA adapter's files, checked without torch: what vLLM can serve (config) and what fits the base
model (tensor shapes from safetensors headers). Serving runs these before every load; imports run them first."""

from __future__ import annotations

import logging
import math
import re
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


# An imported adapter_config.json is tenant input that PEFT and vLLM interpret later (worker children, serving), so
# it is rewritten from an allowlist (sanitized_adapter_config) instead of being stored as uploaded:
# - kept (each type-checked): what a LoRA adapter needs to be loaded and served;
_KEPT_KEYS = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "bias",
        "use_rslora",
        "fan_in_fan_out",
        "task_type",
        "base_model_name_or_path",
        "revision",
    }
)
# - accepted only at PEFT 0.21's default (what every PEFT export writes) and dropped: each non-default value makes
#   PEFT import a module the config names (megatron_*, auto_mapping), run regexes on module names (layers_pattern,
#   exclude_modules), copy base layers (layer_replication), rewrite base weights at load (init_lora_weights other
#   than true: PiSSA, OLoRA, LoftQ...) or train something vLLM cannot serve. A non-default value is a 422 naming it.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "auto_mapping": (None,),  # or transformers' class of the base model (_transformers_mapping)
    "corda_config": (None,),
    "ensure_weight_tying": (False,),
    "eva_config": (None,),
    "exclude_modules": (None,),
    "inference_mode": (True, False),
    "init_lora_weights": (True, False, "gaussian"),  # these only initialise the adapter, which loading overwrites
    "kasa_config": (None,),
    "layer_replication": (None,),
    "layers_pattern": (None,),
    "layers_to_transform": (None,),
    "loftq_config": ({}, None),
    "lora_bias": (False,),
    "lora_ga_config": (None,),
    "megatron_config": (None,),
    "megatron_core": ("megatron.core", None),
    "modules_to_save": (None, []),
    "monteclora_config": (None,),
    "peft_version": (),  # any string: informational
    "qalora_group_size": (),  # any whole number: read only with use_qalora
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
    "use_dora": (False, None),
    "use_qalora": (False,),
    "velora_config": (None,),
}
# A module name PEFT matches literally (`name == key or key.endswith("." + name)`); a string target_modules and the
# pattern keys are regexes to PEFT, so only names of this shape are accepted (no ReDoS, no lm_head via a pattern).
_PLAIN_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
MAX_TARGET_MODULES = 64
MAX_MODULE_NAME_CHARS = 128


class AdapterConfigKeyError(ValueError):
    """A config key that is refused (unknown, non-default or not plain module names): the 422 names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _plain_module(key: str, name: str) -> None:
    if len(name) > MAX_MODULE_NAME_CHARS or not _PLAIN_MODULE.fullmatch(name):
        raise AdapterConfigKeyError(
            key, f"{key}: {name!r:.140} is not a plain module name (letters, digits, _ and dots; no regex)"
        )
    if name.rsplit(".", 1)[-1] in UNSERVABLE_MODULES:
        raise AdapterConfigKeyError(key, f"{key}: {name!r}: LoRA on lm_head or embeddings cannot be served by vLLM")


def sanitized_adapter_config(config: dict[str, Any], *, max_rank: int) -> dict[str, Any]:
    """The adapter_config to store: check_adapter_config's checks, then only the allowlisted keys (defaults dropped).

    ValueError for what vLLM cannot serve; AdapterConfigKeyError (naming the key) for a key outside the allowlist,
    a default-only key with another value, a string target_modules or a pattern key that is not a plain name.
    """
    for key, value in config.items():
        if key in _KEPT_KEYS:
            continue
        if key not in _DEFAULT_ONLY:
            raise AdapterConfigKeyError(key, f"{key}: not a LoRA adapter_config key this deployment accepts")
        allowed = _DEFAULT_ONLY[key]
        if key == "peft_version" and isinstance(value, str) and len(value) <= 64:
            continue
        if key == "qalora_group_size" and isinstance(value, int) and not isinstance(value, bool):
            continue
        if key == "auto_mapping" and _transformers_mapping(value):
            continue
        if not any(type(value) is type(ok) and value == ok for ok in allowed):
            shown = ", ".join(json_text(ok) for ok in allowed) or "a short string"
            raise AdapterConfigKeyError(key, f"{key}: only {shown} is accepted; got {json_text(value)[:100]}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterConfigKeyError(
            "target_modules", "target_modules: a string is a regex to PEFT; give a list of module names"
        )
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):  # other shapes: check_adapter_config
        if len(targets) > MAX_TARGET_MODULES:
            raise AdapterConfigKeyError("target_modules", f"target_modules: more than {MAX_TARGET_MODULES} names")
        for name in targets:
            _plain_module("target_modules", name)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key)
        for name in pattern if isinstance(pattern, dict) else {}:
            _plain_module(key, str(name))
    check_adapter_config(config, max_rank=max_rank)
    if config.get("bias", "none") != "none":
        raise AdapterConfigKeyError("bias", "bias: only 'none' can be served by vLLM")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise AdapterConfigKeyError(key, f"{key} must be true or false")
    for key in ("task_type", "base_model_name_or_path", "revision"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and len(value) <= 1000):
            raise AdapterConfigKeyError(key, f"{key} must be a string (at most 1000 characters) or null")
    kept = {key: config[key] for key in sorted(_KEPT_KEYS) if key in config}
    kept["target_modules"] = sorted(targets or [])
    return kept


def _transformers_mapping(value: object) -> bool:
    """PEFT records the base model's class here; AutoPeftModel imports parent_library, so only transformers'."""
    return (
        isinstance(value, dict)
        and set(value) <= {"base_model_class", "parent_library"}
        and all(isinstance(v, str) and len(v) <= 200 for v in value.values())
        and (value.get("parent_library", "transformers") + ".").startswith("transformers.")
    )


def json_text(value: object) -> str:
    import json

    return json.dumps(value, default=str)


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
        # By exact (last) name: a trained adapter's plain names; an import's regexes never get here (sanitized_...).
        if target.rsplit(".", 1)[-1] in UNSERVABLE_MODULES:
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
