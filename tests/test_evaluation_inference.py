"""Batched left-padded greedy generation, the adapter scale, derive and merge, on the tiny model (no services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from core.adapter_ops import LoraScaler, derive_adapter, load_adapter, load_base_model, merge_adapter
from core.chat import Message
from core.demo_data import demo_rows
from core.evaluation.inference import chat_prompts, generate_greedy, reference_losses

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def random_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 all-linear LoRA with random (non-zero) B, so it visibly changes the output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_base_model(str(model_dir)),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    out = tmp_path_factory.mktemp("adapter") / "random"
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def conversations() -> list[list[Message]]:
    rows = [r["messages"] for r in demo_rows(7, seed=3)]
    # Very different prompt lengths in one batch: a one-word prompt and a ~200-token one.
    rows.append([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "positive"}])
    long_text = "Classify the sentiment: " + " ".join(["river stone bridge table"] * 40) + " good"
    rows.append([{"role": "user", "content": long_text}, {"role": "assistant", "content": "positive"}])
    return rows


def _greedy(model: Any, tokenizer: Any, prompts: list[str], batch_size: int) -> list[list[int]]:
    return generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=NEW_TOKENS)


def test_left_padded_batches_equal_one_by_one(
    model_dir: Path, tokenizer: Any, random_adapter: Path, conversations: list
) -> None:
    prompts = chat_prompts(tokenizer, conversations)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert max(lengths) > 10 * min(lengths)
    base = load_base_model(str(model_dir))
    one_by_one = _greedy(base, tokenizer, prompts, 1)
    assert _greedy(base, tokenizer, prompts, len(prompts)) == one_by_one
    assert _greedy(base, tokenizer, prompts, 4) == one_by_one
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    tuned = load_adapter(load_base_model(str(model_dir)), random_adapter)
    assert _greedy(tuned, tokenizer, prompts, len(prompts)) == _greedy(tuned, tokenizer, prompts, 1)


def test_reference_loss_does_not_depend_on_the_batch(model_dir: Path, tokenizer: Any, conversations: list) -> None:
    base = load_base_model(str(model_dir))
    together = reference_losses(base, tokenizer, conversations, batch_size=len(conversations), max_length=512)
    alone = reference_losses(base, tokenizer, conversations, batch_size=1, max_length=512)
    # Only the assistant turn counts: "positive"/"negative" plus the end-of-turn tokens.
    assert all(0 < r.tokens <= 4 for r in together)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    for a, b in zip(together, alone, strict=True):
        assert a.nll == pytest.approx(b.nll, rel=1e-4)


def test_scale_zero_is_the_base_model_and_scale_changes_the_output(
    model_dir: Path, tokenizer: Any, random_adapter: Path, conversations: list
) -> None:
    prompts = chat_prompts(tokenizer, conversations)
    base_tokens = _greedy(load_base_model(str(model_dir)), tokenizer, prompts, 8)
    tuned = load_adapter(load_base_model(str(model_dir)), random_adapter)
    scaler = LoraScaler(tuned)
    full = _greedy(tuned, tokenizer, prompts, 8)
    assert full != base_tokens
    scaler.set_scale(0.0)
    assert _greedy(tuned, tokenizer, prompts, 8) == base_tokens
    scaler.set_scale(1.0)
    assert _greedy(tuned, tokenizer, prompts, 8) == full


def test_scaling_b_equals_scaling_peft_scaling(model_dir: Path, tokenizer: Any, random_adapter: Path) -> None:
    """The rule everything rests on (docs/architecture.md, "Adapter scale"): B times s is PEFT's `scaling` times s."""
    ids = tokenizer("Classify the sentiment: good river", return_tensors="pt")
    by_b = load_adapter(load_base_model(str(model_dir)), random_adapter)
    LoraScaler(by_b).set_scale(0.5)
    by_scaling = load_adapter(load_base_model(str(model_dir)), random_adapter)
    for module in by_scaling.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            module.scaling["default"] *= 0.5
    with torch.inference_mode():
        torch.testing.assert_close(by_b(**ids).logits, by_scaling(**ids).logits, rtol=1e-5, atol=1e-5)


def test_derive_and_merge_equal_the_scaled_adapter(
    model_dir: Path, tokenizer: Any, random_adapter: Path, conversations: list, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    prompts = chat_prompts(tokenizer, conversations)
    tuned = load_adapter(load_base_model(str(model_dir)), random_adapter)
    LoraScaler(tuned).set_scale(0.5)
    expected = _greedy(tuned, tokenizer, prompts, 8)

    derived_dir = tmp_path / "derived"
    derived_dir.mkdir()
    derive_adapter(random_adapter, derived_dir, 0.5)
    derived = load_adapter(load_base_model(str(model_dir)), derived_dir)
    assert _greedy(derived, tokenizer, prompts, 8) == expected

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    merge_adapter(str(model_dir), random_adapter, merged_dir, 0.5)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "config.json").is_file()
    assert (merged_dir / "tokenizer.json").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in merged_dir.iterdir())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert _greedy(merged, AutoTokenizer.from_pretrained(merged_dir), prompts, 8) == expected
