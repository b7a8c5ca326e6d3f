"""The adapter scale s (docs/architecture.md, "Adapter scale"): the LoRA delta (alpha/r)·BA times s is the delta with B times s.

Used three ways with one rule: an evaluation sweeps s on a loaded PeftModel, `derive` writes a new adapter
with B scaled, `merge` folds W0 + s·(alpha/r)·BA into a full model. Torch; worker side only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MIN_SCALE, MAX_SCALE = 0.0, 10.0
# Methods whose delta is (alpha/r)·BA, so that B times s is the delta times s. (DoRA renormalises the
# direction, so its s = 0 is not the base model; prompt and prefix tuning have no B.)
SCALABLE_METHODS = ("lora", "qlora")
# Rows of the adapters table that are whole models: loaded as they are, not over the base model.
FULL_MODEL_METHODS = ("full", "merged")


def check_scalable(method: str, scales: list[float] | None, *, param: str) -> None:
    """Refuse a scale other than 1 for a method it does not apply to."""
    from core.errors import InvalidInput

    if method not in SCALABLE_METHODS and any(s != 1.0 for s in scales or []):
        raise InvalidInput(
            f"the adapter scale applies to LoRA and QLoRA adapters only; this one is {method!r}", param=param
        )


def is_lora_b(name: str) -> bool:
    """A LoRA up-projection tensor: PEFT names it lora_B (lora_embedding_B for embeddings)."""
    return ".lora_B." in name or ".lora_embedding_B." in name or name.endswith((".lora_B", ".lora_embedding_B"))


class LoraScaler:
    """Sets the scale of a loaded PeftModel's adapter in place, from a copy of its trained B tensors."""

    def __init__(self, model: Any) -> None:
        self.params = {n: p for n, p in model.named_parameters() if is_lora_b(n)}
        if not self.params:
            raise ValueError("the model has no lora_B tensors to scale")
        self.original = {n: p.detach().clone() for n, p in self.params.items()}

    def set_scale(self, scale: float) -> None:
        import torch

        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.original[name] * scale)


def derive_adapter(source_dir: Path, out_dir: Path, scale: float) -> None:
    """Write a copy of the adapter in source_dir to out_dir with every lora_B tensor times scale."""
    from safetensors.torch import load_file, save_file

    weights = source_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"the adapter has no {ADAPTER_WEIGHTS}")
    for item in source_dir.iterdir():
        if item.name != ADAPTER_WEIGHTS and item.is_file():
            shutil.copy2(item, out_dir / item.name)
    tensors = load_file(str(weights))
    if not any(is_lora_b(name) for name in tensors):
        raise ValueError("the adapter has no lora_B tensors to scale")
    scaled = {name: (t * scale).contiguous() if is_lora_b(name) else t for name, t in tensors.items()}
    save_file(scaled, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_base_model(base_model: str) -> Any:
    """The base model as every worker-side path loads it: its own dtype, no remote code, eval mode."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto", trust_remote_code=False)
    return model.eval()


def load_adapter(base: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


def load_for_evaluation(base_model: str, method: str | None, adapter_dir: Path | None) -> Any:
    """The model an evaluation runs: the base, the base plus an adapter, or a whole (full / merged) model."""
    if adapter_dir is None or method is None:
        return load_base_model(base_model)
    if method in FULL_MODEL_METHODS:
        return load_base_model(str(adapter_dir))
    return load_adapter(load_base_model(base_model), adapter_dir)


def merge_adapter(base_model: str, adapter_dir: Path, out_dir: Path, scale: float) -> None:
    """Write W0 + scale·(alpha/r)·BA as a full model (safetensors, config, tokenizer) to out_dir."""
    from transformers import AutoTokenizer

    model = load_adapter(load_base_model(base_model), adapter_dir)
    LoraScaler(model).set_scale(scale)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(str(out_dir))
