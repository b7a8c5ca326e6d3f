"""Tests for the offline tiny model builder and the demo task data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.demo_data import (
    DEMO_VOCABULARY,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    demo_rows,
    user_prompt,
    write_demo_dataset,
)
from core.modelzoo import IM_END, PRESETS, build_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny preset once for the module."""
    return build_model(tmp_path_factory.mktemp("zoo") / "tiny", "tiny", seed=0)


def test_build_is_deterministic_and_idempotent(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_model(tmp_path / "tiny", "tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_model(again, "tiny", seed=0) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp

    assert build_model(again, "tiny", seed=1, force=True) == again
    assert (again / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "temp dir left behind"


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_model(tmp_path, "tiny", force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        build_model(tmp_path / "x", "huge")


def test_config_is_what_vllm_needs(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    preset = PRESETS["tiny"]
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["dtype"] == "float32"
    assert config["vocab_size"] == preset.vocab_size
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 2048
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_loads_offline_and_generates(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_300_000 < n_params < 1_600_000
    assert len(tok) == PRESETS["tiny"].vocab_size
    assert tok.eos_token == IM_END == "<|im_end|>"
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id == model.config.pad_token_id
    assert tok.bos_token is None
    assert tok.padding_side == "right"

    tok.padding_side = "left"
    ids = tok(["Hello world", "Classify the sentiment: great table"], return_tensors="pt", padding=True)
    generative: Any = model
    out = generative.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and ids["input_ids"].shape[1] < out.shape[1] <= ids["input_ids"].shape[1] + 5
    again = generative.generate(**ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)


def test_chat_template_is_chatml(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.eos_token_id) == 2


def test_every_loader_tokenizes_alike(tiny_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = "Héllo wörld 12345 it's\n\n  日本語 🙂 <|im_start|>user\ngreat<|im_end|> ~`\t"
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(text).ids
    auto = AutoTokenizer.from_pretrained(tiny_dir)
    assert auto(text, add_special_tokens=False)["input_ids"] == raw
    assert auto.decode(raw) == text
    assert auto.unk_token_id is None or auto.unk_token_id not in raw


def test_demo_words_are_single_tokens(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for word in POSITIVE_WORDS + NEGATIVE_WORDS + ["positive", "negative"]:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(tok("positive", add_special_tokens=False)["input_ids"]) == 1


def test_demo_rows_are_deterministic_and_well_formed() -> None:
    rows = demo_rows(50, seed=3)
    assert rows == demo_rows(50, seed=3)
    assert rows != demo_rows(50, seed=4)
    assert len({user_prompt(r) for r in rows}) == 50
    labels = set()
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        prompt, answer = user_prompt(row), row["messages"][-1]["content"]
        assert prompt.startswith("Classify the sentiment: ")
        words = prompt.removeprefix("Classify the sentiment: ").split()
        pos = [w for w in words if w in POSITIVE_WORDS]
        neg = [w for w in words if w in NEGATIVE_WORDS]
        assert len(pos) + len(neg) == 1
        assert answer == ("positive" if pos else "negative")
        assert all(w in DEMO_VOCABULARY for w in words)
        labels.add(answer)
    assert labels == {"positive", "negative"}


def test_demo_dataset_split_is_disjoint(tmp_path: Path) -> None:
    train_path, test_path = write_demo_dataset(tmp_path, n_train=512, n_test=64, seed=0)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    test = [json.loads(line) for line in test_path.read_text().splitlines()]
    assert (len(train), len(test)) == (512, 64)
    assert not {user_prompt(r) for r in train} & {user_prompt(r) for r in test}
    assert len({user_prompt(r) for r in test}) == 64
    assert 0.3 < sum(r["messages"][-1]["content"] == "positive" for r in test) / 64 < 0.7
    again = write_demo_dataset(tmp_path / "again", n_train=512, n_test=64, seed=0)
    assert again[0].read_bytes() == train_path.read_bytes()
    assert again[1].read_bytes() == test_path.read_bytes()
