"""Multi-process training settings: DeepSpeed ZeRO configs and FSDP arguments for the HF Trainer.

DDP needs nothing beyond torchrun's environment. DeepSpeed and FSDP need CUDA workers (the API refuses
them on a CPU deployment); the child is still launched through torchrun, and the Trainer picks these up.
"""

from __future__ import annotations

from typing import Any

from core.jobspec import Distributed, Hyperparameters


def deepspeed_config(d: Distributed) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO stage 1, 2 or 3, with optional CPU offload; "auto" defers to the Trainer."""
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if d.offload == "cpu":
        # Stage 1 and 2 can offload the optimizer state; stage 3 can offload the parameters as well.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def fsdp_arguments(d: Distributed) -> dict[str, Any]:
    """TrainingArguments for FSDP: full sharding (ZeRO-3-like), optional CPU offload of parameters."""
    options = "full_shard auto_wrap" + (" offload" if d.offload == "cpu" else "")
    return {
        "fsdp": options,
        "fsdp_config": {
            "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer", "LlamaDecoderLayer"],
            "use_orig_params": True,
        },
    }


def validate_deepspeed_config(config: dict[str, Any]) -> list[str]:
    """Problems in a DeepSpeed config that would only surface on a GPU machine; empty when it is sound."""
    problems = []
    zero = config.get("zero_optimization", {})
    if zero.get("stage") not in (1, 2, 3):
        problems.append("zero_optimization.stage must be 1, 2 or 3")
    if "offload_param" in zero and zero.get("stage") != 3:
        problems.append("offload_param needs ZeRO stage 3")
    for key in ("offload_optimizer", "offload_param"):
        if key in zero and zero[key].get("device") not in ("cpu", "nvme"):
            problems.append(f"zero_optimization.{key}.device must be cpu or nvme")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key) not in ("auto",) and not isinstance(config.get(key), int):
            problems.append(f"{key} must be an integer or auto")
    return problems


def trainer_distributed_arguments(hp: Hyperparameters) -> dict[str, Any]:
    """Extra TrainingArguments for the job's strategy (none for DDP or a single process)."""
    d = hp.distributed
    if d is None or d.strategy == "ddp":
        return {}
    if d.strategy == "deepspeed":
        config = deepspeed_config(d)
        problems = validate_deepspeed_config(config)
        if problems:
            raise ValueError("; ".join(problems))
        return {"deepspeed": config}
    return fsdp_arguments(d)
