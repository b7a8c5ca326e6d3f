"""Training throughput and peak memory per configuration, and our path vs a plain HF Trainer script.

    python -m bench.train [--preset bench] [--steps 20] [--out bench/results/train.json]

Each configuration runs in its own process (peak RSS is per process) on the same model, data and
hyperparameters; figures are tokens/s of non-padding tokens and ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "reference (HF Trainer + PEFT, padding)": ("reference", {}),
    "lora": ("lora", {}),
    "lora + gradient checkpointing": ("lora", {"gradient_checkpointing": True}),
    "lora + packing": ("lora", {"packing": True}),
    "lora bf16": ("lora", {"precision": "bf16"}),
    "qlora (nf4, double quant)": ("qlora", {}),
    "full fine-tuning": ("full", {}),
}


def variable_length_rows(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Chat rows whose lengths vary a lot (8 to 63 words), where padding wastes most of a batch."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud paper green light music table window".split()
    rows = []
    for _ in range(n):
        length = int(rng.paretovariate(1.2) * 4) % 60 + 4
        rows.append(
            [
                {"role": "user", "content": " ".join(rng.choice(words) for _ in range(length))},
                {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))},
            ]
        )
    return rows


def _current_rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def long_rows(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Rows of ~300 tokens each, where activations dominate training memory."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud paper green light music table window".split()
    return [
        [
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(150))},
            {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(20))},
        ]
        for _ in range(n)
    ]


ROWS = {"variable": variable_length_rows, "long": long_rows}


def run_one(
    model_dir: str, method: str, knobs: dict[str, object], steps: int, batch_size: int, rows: str = "variable"
) -> dict[str, float]:
    """One configuration, in this process: returns tokens/s, peak RSS and the final loss."""
    import torch
    from transformers import AutoTokenizer

    from core.jobspec import Hyperparameters
    from worker.training import build_trainer, encode_rows

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hp = Hyperparameters(
        max_steps=steps,
        batch_size=batch_size,
        learning_rate=1e-4,
        max_seq_length=512,
        checkpoint_every_steps=10**6,
        seed=0,
        **knobs,
    )
    examples, _ = encode_rows(tokenizer, ROWS[rows](steps * batch_size, seed=0), hp)
    with tempfile.TemporaryDirectory() as out:
        if method == "reference":
            trainer, tokens = reference_trainer(model_dir, tokenizer, examples, hp, out)
        else:
            trainer, collator = build_trainer(
                base_model=model_dir,
                method=method,
                hp=hp,
                examples=examples,
                pad_token_id=tokenizer.pad_token_id,
                output_dir=out,
                logging_steps=10**6,
                use_cpu=True,
            )
        rss_before = _current_rss_mib()
        started = time.perf_counter()
        result = trainer.train()
        elapsed = time.perf_counter() - started
    real_tokens = tokens.real_tokens if method == "reference" else collator.real_tokens
    return {
        "tokens_per_s": real_tokens / elapsed,
        "seconds": elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # The high-water mark above what the process held when training began: activations, grads, optimizer.
        "training_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before,
        "train_loss": float(result.training_loss),
    }


def reference_trainer(model_dir, tokenizer, examples, hp, out):
    """The plain script a user would write: HF Trainer + PEFT LoRA + DataCollatorForSeq2Seq padding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    class CountingCollator(DataCollatorForSeq2Seq):
        real_tokens = 0

        def __call__(self, features, return_tensors=None):
            CountingCollator.real_tokens += sum(len(f["input_ids"]) for f in features)
            return super().__call__(features, return_tensors)

    import torch

    torch.manual_seed(hp.seed)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=hp.batch_size,
        max_steps=hp.max_steps,
        learning_rate=hp.learning_rate,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=10**6,
    )
    collator = CountingCollator(tokenizer, padding=True, label_pad_token_id=-100)
    return Trainer(model=model, args=args, train_dataset=examples, data_collator=collator), CountingCollator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench", help="core.modelzoo preset (bench is ~30M parameters)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", choices=sorted(ROWS), default="variable", help="variable-length or long rows")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.only:
        method, knobs = CONFIGS[args.only]
        print(json.dumps(run_one(args.model_dir, method, knobs, args.steps, args.batch_size, args.rows)))
        return

    from core.modelzoo import build_model

    model_dir = build_model(Path(tempfile.gettempdir()) / f"tuneserve-bench-{args.preset}", preset=args.preset)
    results: dict[str, dict[str, float]] = {}
    for name in CONFIGS:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.train",
                "--only",
                name,
                "--model-dir",
                str(model_dir),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  measured {name}: {results[name]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)

    reference = results["reference (HF Trainer + PEFT, padding)"]["tokens_per_s"]
    lora = results["lora"]["tokens_per_s"]
    ratios = {
        "ours (lora) vs reference": lora / reference,
        "packing vs padding (lora)": results["lora + packing"]["tokens_per_s"] / lora,
        "gradient checkpointing training memory vs lora": (
            results["lora + gradient checkpointing"]["training_peak_mib"] / results["lora"]["training_peak_mib"]
        ),
    }
    print(
        f"\ntraining on preset {args.preset}: {args.steps} steps x batch {args.batch_size}, variable-length rows, CPU"
    )
    print(f"{'configuration':<42} {'tokens/s':>10} {'peak RSS MiB':>13} {'training MiB':>13} {'loss':>8}")
    for name, r in results.items():
        print(
            f"{name:<42} {r['tokens_per_s']:>10.0f} {r['peak_rss_mib']:>13.0f} {r['training_peak_mib']:>13.0f} {r['train_loss']:>8.3f}"
        )
    print()
    for name, value in ratios.items():
        print(f"{name:<42} {value:>10.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "preset": args.preset,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "results": results,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
