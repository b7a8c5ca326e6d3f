"""DeepSpeed ZeRO and FSDP settings are generated from a job's `distributed` option and validated.

They run only on CUDA workers; DDP itself is trained end to end in tests/test_training_methods.py.
"""

from __future__ import annotations

import json

import pytest

from core.jobspec import Distributed, Hyperparameters
from worker.distributed import (
    deepspeed_config,
    fsdp_arguments,
    trainer_distributed_arguments,
    validate_deepspeed_config,
)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_deepspeed_configs_are_valid_json_for_every_stage(stage: int, offload: str) -> None:
    d = Distributed(strategy="deepspeed", zero_stage=stage, offload=offload, num_processes=2)
    config = json.loads(json.dumps(deepspeed_config(d)))
    assert validate_deepspeed_config(config) == []
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) is (offload == "cpu")
    assert ("offload_param" in zero) is (offload == "cpu" and stage == 3)
    assert trainer_distributed_arguments(Hyperparameters(distributed=d)) == {"deepspeed": config}


def test_validation_catches_what_deepspeed_would_refuse() -> None:
    bad = {"zero_optimization": {"stage": 2, "offload_param": {"device": "gpu"}}, "train_micro_batch_size_per_gpu": "x"}
    problems = validate_deepspeed_config(bad)
    assert "offload_param needs ZeRO stage 3" in problems
    assert any("offload_param.device" in p for p in problems)
    assert any("train_micro_batch_size_per_gpu" in p for p in problems)


def test_fsdp_arguments() -> None:
    args = fsdp_arguments(Distributed(strategy="fsdp", offload="cpu"))
    assert args["fsdp"] == "full_shard auto_wrap offload"
    assert "Qwen2DecoderLayer" in args["fsdp_config"]["transformer_layer_cls_to_wrap"]


def test_ddp_and_single_process_need_no_extra_arguments() -> None:
    assert trainer_distributed_arguments(Hyperparameters()) == {}
    assert trainer_distributed_arguments(Hyperparameters(distributed=Distributed(strategy="ddp"))) == {}
