"""An imported adapter_config.json is rewritten from an allowlist (issue 25, item 2): PEFT never sees a module to
import (megatron_*, auto_mapping), a regex over module names (a string target_modules, pattern keys), copied base
layers (layer_replication) or lm_head by another spelling; each is a 422 naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.adapter_files import AdapterConfigKeyError, sanitized_adapter_config
from tests.support.adapters import files_of, peft_adapter, tar_gz
from tests.support.stack import Stack


@pytest.fixture(scope="module")
def peft_export() -> dict[str, Any]:
    """What the installed PEFT writes for a LoRA adapter (every key, at its defaults)."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    exported: dict[str, Any] = json.loads(
        json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )
    return exported


def test_a_peft_export_is_accepted_and_rewritten_to_the_allowlist(peft_export: dict[str, Any]) -> None:
    clean = sanitized_adapter_config(peft_export, max_rank=64)
    assert clean["r"] == 4 and clean["target_modules"] == ["q_proj", "v_proj"] and clean["peft_type"] == "LORA"
    assert not any(k.startswith("megatron") for k in clean)
    assert "layer_replication" not in clean and "init_lora_weights" not in clean and "auto_mapping" not in clean


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"megatron_core": "os"}, "megatron_core"),
        ({"megatron_config": {"tensor_model_parallel_size": 1}}, "megatron_config"),
        ({"auto_mapping": {"base_model_class": "X", "parent_library": "os"}}, "auto_mapping"),
        ({"target_modules": ".*(a+)+$"}, "target_modules"),
        ({"target_modules": "all-linear"}, "target_modules"),
        ({"target_modules": ["q_proj", "(a+)+"]}, "target_modules"),
        ({"target_modules": ["q_proj", "model.lm_head"]}, "target_modules"),
        ({"target_modules": ["lm_head"]}, "target_modules"),
        ({"rank_pattern": {"(.*)+": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"q.*": 8}}, "alpha_pattern"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"exclude_modules": ".*"}, "exclude_modules"),
        ({"layer_replication": [[0, 4], [2, 5]]}, "layer_replication"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"bias": "all"}, "bias"),
        ({"something_new": 1}, "something_new"),
    ],
)
def test_refused_keys_are_named(peft_export: dict[str, Any], changes: dict[str, Any], key: str) -> None:
    with pytest.raises(AdapterConfigKeyError) as info:
        sanitized_adapter_config({**peft_export, **changes}, max_rank=64)
    assert info.value.key == key and key in str(info.value), str(info.value)


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_imports_with_hostile_configs_are_422_and_a_good_one_is_stored_clean(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    source: Path = peft_adapter(stack.settings.base_model, tmp_path_factory.mktemp("allow") / "a", trained=True)
    good = files_of(source)
    config = json.loads(good["adapter_config.json"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"megatron_config": {"x": 1}, "megatron_core": "tests.hostile"}, "megatron_config"),
        ({"target_modules": "^(?!.*lm_head).*_proj$"}, "target_modules"),
        ({"layer_replication": [[0, 2], [0, 2]]}, "layer_replication"),
        ({"auto_mapping": {"base_model_class": "X", "parent_library": "tests.hostile"}}, "auto_mapping"),
    ]
    for changes, key in cases:
        body = json.dumps({**config, **changes}).encode()
        response = stack.client.post(
            "/adapters", files={"file": ("a.tar.gz", tar_gz({**good, "adapter_config.json": body}))}
        )
        assert response.status_code == 422, (changes, response.text)
        assert response.json()["error"]["param"] == f"file:adapter_config.json:{key}", response.text
    response = stack.client.post("/adapters", files={"file": ("a.tar.gz", tar_gz(good))})
    assert response.status_code == 202, response.text
    roots = [Path(stack.settings.data_dir), *([Path(stack.settings.store_root)] if stack.settings.store_root else [])]
    name = response.json()["name"]
    found = [p for root in roots for p in root.rglob("adapter_config.json") if name in str(p)]
    assert found, "the imported adapter's config is in the store"
    kept = json.loads(found[0].read_text())
    assert not any(k.startswith("megatron") for k in kept) and "layer_replication" not in kept
