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
    # DPO on pairs built from the same rows (chosen: the row's answer, rejected: another row's): our job path
    # (worker.objectives over our PEFT model) vs the plain TRL script a user would write.
    "dpo reference (plain TRL DPOTrainer + PEFT)": ("dpo-reference", {}),
    "dpo (ours)": ("dpo", {}),
    # TRL's DPOConfig defaults to bf16 and gradient checkpointing; ours to the job's defaults (fp32, none): the same
    # settings side by side.
    "dpo (ours, bf16 + gradient checkpointing as TRL)": ("dpo", {"precision": "bf16", "gradient_checkpointing": True}),
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
    if method in ("dpo", "dpo-reference"):
        return run_dpo(model_dir, tokenizer, method, hp, preference_pairs(ROWS[rows](steps * batch_size, seed=0)))
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


def preference_pairs(rows: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    """Conversational DPO rows: each row's answer chosen, the next row's answer rejected."""
    return [
        {
            "prompt": row[:-1],
            "chosen": [row[-1]],
            "rejected": [{"role": "assistant", "content": rows[(i + 1) % len(rows)][-1]["content"] + " no"}],
        }
        for i, row in enumerate(rows)
    ]


def run_dpo(model_dir: str, tokenizer: Any, method: str, hp: Any, pairs: list[dict[str, Any]]) -> dict[str, float]:
    """DPO for hp.max_steps: ours (the job path) or the plain TRL script; tokens are TRL's own count (num_tokens)."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from worker.objectives import build_objective_trainer
    from worker.training import _logged_tokens, trainable_model, training_argument_values

    with tempfile.TemporaryDirectory() as out:
        if method == "dpo":
            arguments = training_argument_values(
                hp, output_dir=out, logging_steps=hp.max_steps, use_cpu=True, distributed=False
            )
            trainer = build_objective_trainer(
                objective="dpo",
                model=trainable_model(model_dir, "lora", hp, None),
                reference="base",
                tokenizer=tokenizer,
                hp=hp,
                rows=pairs,
                arguments=arguments,
                grader=None,
                callbacks=[],
            )
        else:
            from peft import LoraConfig
            from transformers import AutoModelForCausalLM

            torch.manual_seed(hp.seed)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            peft_config = LoraConfig(
                r=hp.lora_r, lora_alpha=int(hp.lora_alpha), lora_dropout=hp.lora_dropout, target_modules="all-linear"
            )
            args = DPOConfig(
                output_dir=out,
                per_device_train_batch_size=hp.batch_size,
                max_steps=hp.max_steps,
                learning_rate=hp.learning_rate,
                max_length=hp.max_seq_length,
                report_to=[],
                use_cpu=True,
                save_strategy="no",
                disable_tqdm=True,
                seed=hp.seed,
                logging_steps=hp.max_steps,
            )
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(pairs),
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        rss_before = _current_rss_mib()
        started = time.perf_counter()
        result = trainer.train()
        elapsed = time.perf_counter() - started
        tokens = _logged_tokens(trainer)
    return {
        "tokens_per_s": tokens / elapsed,
        "seconds": elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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


# Each ratio and the two configurations it divides (numerator, denominator, measure); shown when both ran.
RATIOS = {
    "ours (lora) vs reference": ("lora", "reference (HF Trainer + PEFT, padding)", "tokens_per_s"),
    "packing vs padding (lora)": ("lora + packing", "lora", "tokens_per_s"),
    "gradient checkpointing training memory vs lora": ("lora + gradient checkpointing", "lora", "training_peak_mib"),
    "dpo: ours vs plain TRL, same settings (tokens/s)": (
        "dpo (ours, bf16 + gradient checkpointing as TRL)",
        "dpo reference (plain TRL DPOTrainer + PEFT)",
        "tokens_per_s",
    ),
    "dpo training memory: ours vs plain TRL, same settings": (
        "dpo (ours, bf16 + gradient checkpointing as TRL)",
        "dpo reference (plain TRL DPOTrainer + PEFT)",
        "training_peak_mib",
    ),
    "dpo: ours (job defaults, fp32) vs plain TRL (tokens/s)": (
        "dpo (ours)",
        "dpo reference (plain TRL DPOTrainer + PEFT)",
        "tokens_per_s",
    ),
}


def _ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        name: results[top][measure] / max(results[bottom][measure], 1e-9)
        for name, (top, bottom, measure) in RATIOS.items()
        if top in results and bottom in results
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench", help="core.modelzoo preset (bench is ~30M parameters)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", choices=sorted(ROWS), default="variable", help="variable-length or long rows")
    parser.add_argument("--configs", help="Configuration names to run, separated by semicolons (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.only:
        method, knobs = CONFIGS[args.only]
        print(json.dumps(run_one(args.model_dir, method, knobs, args.steps, args.batch_size, args.rows)))
        return

    from core.modelzoo import build_model

    model_dir = build_model(Path(tempfile.gettempdir()) / f"tuneserve-bench-{args.preset}", preset=args.preset)
    results: dict[str, dict[str, float]] = {}
    names = [n.strip() for n in args.configs.split(";")] if args.configs else list(CONFIGS)
    for name in names:
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

    ratios = _ratios(results)
    print(
        f"\ntraining on preset {args.preset}: {args.steps} steps x batch {args.batch_size}, variable-length rows, CPU"
    )
    print(f"{'configuration':<50} {'tokens/s':>10} {'peak RSS MiB':>13} {'training MiB':>13} {'loss':>8}")
    for name, r in results.items():
        print(
            f"{name:<50} {r['tokens_per_s']:>10.0f} {r['peak_rss_mib']:>13.0f} {r['training_peak_mib']:>13.0f} {r['train_loss']:>8.3f}"
        )
    print()
    for name, value in ratios.items():
        print(f"{name:<56} {value:>10.2f}x")
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
