"""Every training method as a model to train: LoRA, QLoRA, DoRA, rsLoRA, prompt / P- / prefix tuning, full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import TrainingError
from core.jobspec import LORA_METHODS, Hyperparameters

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class Servability:
    """Whether vLLM can serve what a method produces, and why not."""

    servable: bool
    reason: str | None = None


def servability(method: str, target_modules: list[str]) -> Servability:
    if method == "dora":
        return Servability(False, "vLLM cannot serve DoRA adapters (use_dora); evaluate or merge it instead")
    if method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        return Servability(
            False, f"vLLM cannot serve {method} adapters (virtual tokens); evaluate it through transformers"
        )
    if method == "full":
        return Servability(
            False, "a full fine-tune is a whole model, not a LoRA adapter; serve it as its own base model"
        )
    unservable = [m for m in target_modules if m in ("lm_head", "embed_tokens")]
    if unservable:
        return Servability(False, f"vLLM cannot serve LoRA on {unservable}")
    return Servability(True, None)


def load_base_model(model_dir: str, method: str, hp: Hyperparameters) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if method != "qlora":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    from transformers import BitsAndBytesConfig

    compute_dtype = getattr(torch, _DTYPES[hp.qlora_compute_dtype])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=compute_dtype)


def wrap_for_method(model: Any, method: str, hp: Hyperparameters) -> Any:
    """The trainable model: PEFT wrapped for adapter methods, the model itself for full fine-tuning."""
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
        get_peft_model,
        prepare_model_for_kbit_training,
    )

    if method == "full":
        return model
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hp.gradient_checkpointing)
    if method in LORA_METHODS:
        config: Any = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # PEFT scales by any number; its annotation says int
            lora_dropout=hp.lora_dropout,
            target_modules=hp.resolved_target_modules(),
            use_rslora=hp.use_rslora,
            use_dora=method == "dora",
            task_type=TaskType.CAUSAL_LM,
        )
    elif method == "prompt_tuning":
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hp.num_virtual_tokens)
    elif method == "p_tuning":
        config = PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=hp.num_virtual_tokens,
            encoder_hidden_size=hp.encoder_hidden_size,
        )
    elif method == "prefix_tuning":
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hp.num_virtual_tokens)
    else:  # pragma: no cover - JobSpec's Literal refuses anything else
        raise TrainingError("invalid_method", f"unknown method {method}", param="method")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise TrainingError("invalid_target_modules", str(e), param="hyperparameters.target_modules") from None


def trained_target_modules(model: Any, method: str) -> list[str]:
    """The layer names users know (q_proj, ...); PEFT expands "all-linear" to full module paths."""
    if method not in LORA_METHODS:
        return []
    return sorted({m.rsplit(".", 1)[-1] for m in model.peft_config["default"].target_modules})


def load_init_adapter(model: Any, adapter_dir: str, method: str, hp: Hyperparameters) -> Any:
    """The base model with an existing adapter's weights, trainable: a job continues it (SFT, then DPO)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hp.gradient_checkpointing)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
