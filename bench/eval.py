"""Evaluation inference benchmark: left-padded batched greedy generation vs one prompt at a time.

    HF_HUB_OFFLINE=1 python -m bench.eval --preset bench --out bench/results/eval.json

Same model, same prompts (the demo task's chat prompts), in one run: one-by-one,
then batches of 8, 16 and 32. The generated token ids of every batched run must equal the
one-by-one ids (docs/architecture.md, invariant 9); the script exits non-zero if any differ. Prints a table and
writes JSON. Throughput counts generated tokens (up to and including an end-of-turn token).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run(
    preset: str, model_dir: Path | None, n_prompts: int, max_new_tokens: int, batch_sizes: list[int]
) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from core.adapter_ops import load_base_model
    from core.demo_data import demo_rows
    from core.evaluation.inference import chat_prompts, generate_greedy
    from core.modelzoo import build_model

    with tempfile.TemporaryDirectory() as tmp:
        model_path = model_dir or build_model(Path(tmp) / preset, preset=preset, seed=0)
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        model = load_base_model(str(model_path))
        params = sum(p.numel() for p in model.parameters())
        prompts = chat_prompts(tokenizer, [r["messages"] for r in demo_rows(n_prompts, seed=7)])
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        generate_greedy(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=2)  # warm-up

        rows: list[dict[str, Any]] = []
        reference: list[list[int]] | None = None
        for batch_size in [1, *batch_sizes]:
            started = time.perf_counter()
            tokens = generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
            seconds = time.perf_counter() - started
            if reference is None:
                reference = tokens
            generated = sum(len(t) for t in tokens)
            print(f"  batch {batch_size:>2}: {seconds:.1f}s", file=sys.stderr, flush=True)
            rows.append(
                {
                    "mode": "one-by-one" if batch_size == 1 else "batched",
                    "batch_size": batch_size,
                    "seconds": round(seconds, 3),
                    "generated_tokens": generated,
                    "tokens_per_second": round(generated / seconds, 1),
                    "identical_to_one_by_one": tokens == reference,
                    "differing_prompts": sum(a != b for a, b in zip(tokens, reference, strict=True)),
                }
            )
        base_tps = rows[0]["tokens_per_second"]
        for row in rows:
            row["speedup"] = round(row["tokens_per_second"] / base_tps, 2)
    return {
        "benchmark": "eval_generation",
        "preset": preset if model_dir is None else str(model_dir),
        "parameters": params,
        "prompts": n_prompts,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)},
        "max_new_tokens": max_new_tokens,
        "dtype": str(model.dtype),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"eval generation: {report['preset']} ({report['parameters'] / 1e6:.1f}M params, {report['dtype']}), "
        f"{report['prompts']} prompts of {report['prompt_tokens']['min']}-{report['prompt_tokens']['max']} tokens, "
        f"{report['max_new_tokens']} new tokens, {report['torch_threads']} torch threads"
    )
    print(f"{'mode':<11} {'batch':>5} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'speedup':>8} {'identical':>9}")
    for r in report["results"]:
        print(
            f"{r['mode']:<11} {r['batch_size']:>5} {r['seconds']:>8.2f} {r['generated_tokens']:>7} "
            f"{r['tokens_per_second']:>9.1f} {r['speedup']:>7.2f}x {str(r['identical_to_one_by_one']):>9}"
        )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", help="core.modelzoo preset to build (ignored with --model-dir)")
    parser.add_argument("--model-dir", type=Path, default=None, help="An existing local model instead of a preset")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--out", type=Path, default=Path("bench/results/eval.json"))
    args = parser.parse_args(argv)
    report = run(args.preset, args.model_dir, args.prompts, args.max_new_tokens, args.batch_sizes)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(r["identical_to_one_by_one"] for r in report["results"]):
        print("FAIL: batched greedy outputs differ from one-by-one outputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
