"""What a local base model contains, read from its safetensors headers (no torch, so the API can use it)."""

from __future__ import annotations

import json
import struct
from functools import lru_cache
from pathlib import Path

from core.errors import InvalidInput

# Modules LoRA must not target if vLLM is to serve the adapter.
UNSERVABLE_MODULES = ("lm_head", "embed_tokens")


@lru_cache(maxsize=8)
def weight_names(model_dir: str) -> tuple[str, ...]:
    """Tensor names in every *.safetensors file of a local model; empty for a hub name."""
    path = Path(model_dir)
    names: list[str] = []
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        names.extend(k for k in header if k != "__metadata__")
    return tuple(names)


def linear_module_names(model_dir: str) -> set[str]:
    """Short names of the 2-D weight modules (q_proj, down_proj, ...), which LoRA can target."""
    return {
        name.rsplit(".", 2)[-2] for name in weight_names(model_dir) if name.endswith(".weight") and "norm" not in name
    }


def check_target_modules(model_dir: str, requested: list[str]) -> None:
    """An explicit target_modules list must name modules the base model has (422 naming what matched nothing)."""
    available = linear_module_names(model_dir)
    if not available:
        return  # not a local model: the worker checks when it loads it
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise InvalidInput(
            f"target_modules {unknown} match no module of the base model; it has {sorted(available)}",
            param="hyperparameters.target_modules",
        )


@lru_cache(maxsize=8)
def weight_shapes(model_dir: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every tensor in a local model's *.safetensors files; empty for a hub name."""
    path = Path(model_dir)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        shapes += [(k, tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"]
    return tuple(shapes)


def weight_file_bytes(model_dir: str) -> int:
    """Bytes of a local model's *.safetensors files (what a merged copy of it takes); 0 for a hub name."""
    path = Path(model_dir)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0
