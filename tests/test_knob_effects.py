"""Knobs measured for their effect, not their speed: gradient checkpointing lowers training memory.

Runs the project's own training path (worker.training.build_trainer through bench.train) on the larger
~30M preset, each configuration in its own process so the peak RSS is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.modelzoo import build_model
from tests.support.paths import ROOT

# Both tests train (bench.train in a child process).
pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "bench", preset="bench", seed=0)


def _train(model_dir: Path, config: str) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train",
            "--only",
            config,
            "--model-dir",
            str(model_dir),
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--rows",
            "long",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gradient_checkpointing_lowers_peak_training_memory(bench_model: Path) -> None:
    plain = _train(bench_model, "lora")
    checkpointed = _train(bench_model, "lora + gradient checkpointing")
    # Activations of 8 layers x 8 sequences x ~300 tokens are kept without checkpointing, one layer's with it.
    assert checkpointed["training_peak_mib"] < 0.75 * plain["training_peak_mib"], (plain, checkpointed)
    assert checkpointed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)


def test_packing_computes_the_same_loss_as_padding_with_no_padding(model_dir: Path) -> None:
    """Packed examples must not attend to each other: the packed batch's loss equals the padded batch's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.train import variable_length_rows
    from core.jobspec import Hyperparameters
    from worker.collators import PackingCollator, PaddingCollator
    from worker.training import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples, _ = encode_rows(tokenizer, variable_length_rows(8, seed=1), Hyperparameters())
    padding, packing = PaddingCollator(tokenizer.pad_token_id), PackingCollator()
    with torch.no_grad():
        padded_loss = model(**padding(examples)).loss
        packed_loss = model(**packing(examples)).loss
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packing.batch_tokens == packing.real_tokens < padding.batch_tokens
