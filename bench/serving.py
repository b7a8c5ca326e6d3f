"""Serving benchmark: multi-LoRA vLLM on CPU with and without the tuneserve stacked LoRA ops.

Run from the repository root (the project must be pip-installed so that vLLM finds the
``vllm.general_plugins`` entry point)::

    HF_HUB_OFFLINE=1 python -m bench.serving --preset bench --out bench/results/serving.json

What it measures, in one run:

(a) vLLM, mixed traffic over 8 adapters vs base-only traffic on the same engine, fast plugin ON;
(b) the same with the plugin OFF (stock vLLM CPU LoRA ops). The plugin is chosen at process
    start, so each configuration runs in its own subprocess of this script;
(c) vLLM mixed traffic vs the naive way: transformers + PEFT, request by request, set_adapter;
(d) the first request to a cold adapter vs the same request once the adapter is warm.

It also checks that greedy token ids with the plugin ON equal those with it OFF for every
prompt of the mixed run, and exits non-zero if they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_ADAPTERS = 8
RANK = 8
PLUGIN_LOG_MARK = "tuneserve CPU LoRA: stacked multi-LoRA ops active"


# --------------------------------------------------------------------------- setup (parent)


def build_prompts(model_dir: Path, n: int, seed: int) -> list[str]:
    from transformers import AutoTokenizer

    from core.demo_data import demo_rows

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts: list[str] = []
    for row in demo_rows(n, seed):
        messages = [m for m in row["messages"] if m["role"] != "assistant"]
        prompts.append(str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))
    return prompts


def make_adapters(model_dir: Path, out_dir: Path, n: int, b_scale: float) -> list[str]:
    """n rank-8 all-linear LoRA adapters with random, non-zero A and B (safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        cfg = LoraConfig(
            r=RANK,
            lora_alpha=2 * RANK,
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)  # keep the update a modest fraction of the base weights
        path = out_dir / f"adapter_{i}"
        model.save_pretrained(str(path), safe_serialization=True)
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------- vLLM worker


def _probe_worker(_self=None):
    """Runs inside the vLLM worker (engine core): is the stacked op set in place there?"""
    import os as _os

    from serving.lora_cpu_plugin import is_active

    return {"pid": _os.getpid(), "fast_ops_active": is_active()}


def _timed_generate(llm, prompts, params, lora_requests):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
    dt = time.perf_counter() - t0
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return dt, ids


def run_vllm_worker(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts: list[str] = spec["prompts"]
    adapters: list[str] = spec["adapters"]
    new_tokens: int = spec["new_tokens"]
    repeats: int = spec["repeats"]
    n = len(adapters)

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        enable_lora=True,
        max_loras=n,
        max_lora_rank=RANK,
        max_cpu_loras=n,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    startup_s = time.perf_counter() - t0
    try:
        probe = llm.collective_rpc(_probe_worker)
    except Exception as exc:  # noqa: BLE001 - informational only
        probe = [{"error": repr(exc)}]

    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    reqs = [LoRARequest(f"adapter_{i}", i + 1, path) for i, path in enumerate(adapters)]
    mixed_reqs = [reqs[i % n] for i in range(len(prompts))]

    # Base-only run on a clean engine (no adapter in any slot yet): warms the engine up and
    # gives the reference base outputs.
    _, base_clean_ids = _timed_generate(llm, prompts, greedy, None)

    # (d) cold vs warm adapter: first request to each adapter loads it from disk into the CPU
    # cache and a GPU/CPU slot; the identical second request finds it warm.
    base_single, _ = _timed_generate(llm, prompts[:1], short, None)
    cold, warm = [], []
    for i, req in enumerate(reqs):
        p = [prompts[i]]
        dt_cold, _ = _timed_generate(llm, p, short, [req])
        dt_warm, _ = _timed_generate(llm, p, short, [req])
        cold.append(dt_cold)
        warm.append(dt_warm)

    # Warm-up of the mixed path (all adapters now loaded), then interleaved timed runs.
    _timed_generate(llm, prompts, greedy, mixed_reqs)
    base_times, mixed_times = [], []
    base_ids = mixed_ids = None
    for _ in range(repeats):
        dt, base_ids = _timed_generate(llm, prompts, greedy, None)
        base_times.append(dt)
        dt, mixed_ids = _timed_generate(llm, prompts, greedy, mixed_reqs)
        mixed_times.append(dt)

    # Adapters and base requests in the same batch: every (n+1)-th request has no adapter, so
    # its tokens carry LoRA index -1 next to tokens of all n adapters (last slot occupied).
    with_base_reqs = [None if i % (n + 1) == n else reqs[i % (n + 1)] for i in range(len(prompts))]
    _, with_base_ids = _timed_generate(llm, prompts, greedy, with_base_reqs)

    tokens = len(prompts) * new_tokens
    return {
        "fast_env": os.environ.get("TUNESERVE_CPU_LORA_FAST", "1"),
        "startup_s": startup_s,
        "worker_probe": probe,
        "tokens_per_run": tokens,
        "base_times_s": base_times,
        "mixed_times_s": mixed_times,
        "base_tok_s": tokens / statistics.median(base_times),
        "mixed_tok_s": tokens / statistics.median(mixed_times),
        "cold_adapter_s": cold,
        "warm_adapter_s": warm,
        "base_single_short_s": base_single,
        "base_clean_ids": base_clean_ids,
        "base_ids": base_ids,
        "mixed_ids": mixed_ids,
        "with_base_adapter": [None if r is None else r.lora_int_id - 1 for r in with_base_reqs],
        "with_base_ids": with_base_ids,
    }


def spawn_worker(spec_path: Path, result_path: Path, fast: bool, log_path: Path) -> dict:
    env = dict(os.environ)
    env["TUNESERVE_CPU_LORA_FAST"] = "1" if fast else "0"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc probe function
    cmd = [sys.executable, "-m", "bench.serving", "--worker", str(spec_path), "--worker-out", str(result_path)]
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parent.parent)
        )
    text = Path(log_path).read_text(errors="replace")
    if proc.returncode != 0:
        sys.stderr.write(text[-6000:])
        raise SystemExit(f"vLLM worker (fast={fast}) failed with exit code {proc.returncode}")
    result = json.loads(result_path.read_text())
    result["plugin_log_lines"] = [ln.strip() for ln in text.splitlines() if PLUGIN_LOG_MARK in ln]
    return result


# --------------------------------------------------------------------------- HF + PEFT baseline


def run_hf_peft(model_dir: Path, adapters: list[str], prompts: list[str], new_tokens: int, num_requests: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="adapter_0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"adapter_{i}")
    model.eval()
    gen = model.generation_config
    gen.eos_token_id = None  # like ignore_eos: always generate new_tokens
    gen.do_sample = False
    n = len(adapters)

    def one(i: int) -> list[int]:
        model.set_adapter(f"adapter_{i % n}")
        enc = tok(prompts[i], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id or 0
            )
        return out[0, enc["input_ids"].shape[1] :].tolist()

    # One thread by default: on the 2-core machine this was written on, vLLM's CPU worker
    # reserves one core and computes on the other ("core ids" in its log), so both paths get one
    # core. TUNESERVE_BENCH_HF_THREADS overrides it on larger machines.
    threads = int(os.environ.get("TUNESERVE_BENCH_HF_THREADS", "1"))
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one(0)  # warm-up
        t0 = time.perf_counter()
        ids = [one(i) for i in range(num_requests)]
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(default_threads)
    return {
        "requests": num_requests,
        "seconds": dt,
        "threads": threads,
        "tok_s": num_requests * new_tokens / dt,
        "ids": ids,
    }


# --------------------------------------------------------------------------- report


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(on: dict, off: dict, hf: dict, args, n_prompts: int) -> tuple[dict, list[str]]:
    mismatched = [i for i, (a, b) in enumerate(zip(on["mixed_ids"], off["mixed_ids"], strict=False)) if a != b]
    base_clean_mismatch = {
        name: sum(a != b for a, b in zip(r["base_ids"], r["base_clean_ids"], strict=False))
        for name, r in (("on", on), ("off", off))
    }
    lora_changes = sum(a != b for a, b in zip(on["mixed_ids"], on["base_clean_ids"], strict=False))
    # Requests without an adapter batched together with adapter requests: do they still get
    # exactly the base model's tokens?
    with_base = {
        name: {
            "base_requests": sum(a is None for a in r["with_base_adapter"]),
            "base_requests_differing_from_clean_base": sum(
                ids != r["base_clean_ids"][i]
                for i, (a, ids) in enumerate(zip(r["with_base_adapter"], r["with_base_ids"], strict=False))
                if a is None
            ),
            "adapter_requests_differing_from_adapter_only_run": sum(
                ids != r["mixed_ids"][i]
                for i, (a, ids) in enumerate(zip(r["with_base_adapter"], r["with_base_ids"], strict=False))
                if a is not None and a == i % NUM_ADAPTERS
            ),
        }
        for name, r in (("on", on), ("off", off))
    }
    hf_match = sum(a == b for a, b in zip(hf["ids"], on["mixed_ids"], strict=False))
    cold_extra = {
        name: 1000 * _median([c - w for c, w in zip(r["cold_adapter_s"], r["warm_adapter_s"], strict=False)])
        for name, r in (("on", on), ("off", off))
    }
    res = {
        "preset": args.preset,
        "prompts": n_prompts,
        "new_tokens": args.new_tokens,
        "adapters": NUM_ADAPTERS,
        "rank": RANK,
        "dtype": "float32",
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_at_end": os.getloadavg()},
        "plugin_on": {
            k: on[k]
            for k in (
                "base_tok_s",
                "mixed_tok_s",
                "base_times_s",
                "mixed_times_s",
                "startup_s",
                "worker_probe",
                "plugin_log_lines",
            )
        },
        "plugin_off": {
            k: off[k]
            for k in (
                "base_tok_s",
                "mixed_tok_s",
                "base_times_s",
                "mixed_times_s",
                "startup_s",
                "worker_probe",
                "plugin_log_lines",
            )
        },
        "a_mixed_vs_base_plugin_on": on["mixed_tok_s"] / on["base_tok_s"],
        "b_mixed_vs_base_plugin_off": off["mixed_tok_s"] / off["base_tok_s"],
        "mixed_speedup_on_vs_off": on["mixed_tok_s"] / off["mixed_tok_s"],
        "hf_peft": {k: hf[k] for k in ("requests", "seconds", "tok_s", "threads")},
        "c_vllm_mixed_on_vs_hf_peft": on["mixed_tok_s"] / hf["tok_s"],
        "c_vllm_mixed_off_vs_hf_peft": off["mixed_tok_s"] / hf["tok_s"],
        "d_cold_adapter_extra_ms": cold_extra,
        "cold_adapter_s": {"on": on["cold_adapter_s"], "off": off["cold_adapter_s"]},
        "warm_adapter_s": {"on": on["warm_adapter_s"], "off": off["warm_adapter_s"]},
        "greedy_ids_on_equal_off": not mismatched,
        "greedy_mismatched_prompts": mismatched,
        "prompts_where_lora_changed_output": lora_changes,
        "base_runs_after_adapters_loaded_differing_from_clean_base": base_clean_mismatch,
        "base_and_adapter_requests_in_one_batch": with_base,
        "hf_peft_requests_matching_vllm_on": f"{hf_match}/{hf['requests']}",
        "goals": {
            "a_ge_0.8": on["mixed_tok_s"] / on["base_tok_s"] >= 0.8,
            "c_ge_5x": on["mixed_tok_s"] / hf["tok_s"] >= 5.0,
        },
    }
    hf_label = f"transformers+PEFT one by one, set_adapter ({hf['requests']} requests)"
    lines = [
        f"serving benchmark: preset={args.preset}, {n_prompts} prompts x {args.new_tokens} new "
        f"tokens, {NUM_ADAPTERS} rank-{RANK} all-linear adapters, fp32, median of {args.repeats}",
        "",
        f"{'path':58s} {'tok/s':>8s} {'ratio':>8s}",
        f"{'vLLM base-only, plugin ON':58s} {on['base_tok_s']:8.0f} {1.0:8.2f}",
        f"{'vLLM mixed 8 adapters, plugin ON   (a: vs base ON)':58s} {on['mixed_tok_s']:8.0f} "
        f"{res['a_mixed_vs_base_plugin_on']:8.2f}",
        f"{'vLLM base-only, plugin OFF (stock)':58s} {off['base_tok_s']:8.0f} {1.0:8.2f}",
        f"{'vLLM mixed 8 adapters, plugin OFF  (b: vs base OFF)':58s} {off['mixed_tok_s']:8.0f} "
        f"{res['b_mixed_vs_base_plugin_off']:8.2f}",
        f"{'mixed: plugin ON vs OFF':58s} {'':8s} {res['mixed_speedup_on_vs_off']:8.2f}",
        f"{hf_label:58s} {hf['tok_s']:8.0f} {1.0:8.2f}",
        f"{'  (c) vLLM mixed ON vs transformers+PEFT':58s} {'':8s} {res['c_vllm_mixed_on_vs_hf_peft']:8.2f}",
        f"{'  (c) vLLM mixed OFF vs transformers+PEFT':58s} {'':8s} {res['c_vllm_mixed_off_vs_hf_peft']:8.2f}",
        f"(d) cold adapter first request, extra ms vs warm: ON {cold_extra['on']:.0f} ms, "
        f"OFF {cold_extra['off']:.0f} ms",
        "",
        f"greedy ids plugin ON == OFF (mixed, {n_prompts} prompts): "
        f"{'yes' if not mismatched else 'NO, prompts ' + str(mismatched)}",
        f"prompts whose output the adapter changed vs base: {lora_changes}/{n_prompts}",
        f"base-only runs after adapters were loaded, prompts differing from clean base: "
        f"ON {base_clean_mismatch['on']}, OFF {base_clean_mismatch['off']}",
        f"base requests batched with adapter requests, differing from clean base: "
        f"ON {with_base['on']['base_requests_differing_from_clean_base']}"
        f"/{with_base['on']['base_requests']}, "
        f"OFF {with_base['off']['base_requests_differing_from_clean_base']}"
        f"/{with_base['off']['base_requests']}",
        f"transformers+PEFT ids equal to vLLM (plugin ON): {res['hf_peft_requests_matching_vllm_on']}",
        f"plugin log lines: ON {len(on['plugin_log_lines'])}, OFF {len(off['plugin_log_lines'])}; "
        f"engine-core probe: ON {on['worker_probe']}, OFF {off['worker_probe']}",
    ]
    return res, lines


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="reuse a model built by core.modelzoo (default: build into a temp dir)",
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-requests", type=int, default=16)
    parser.add_argument("--lora-b-scale", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker is not None:
        spec = json.loads(args.worker.read_text())
        args.worker_out.write_text(json.dumps(run_vllm_worker(spec)))
        return 0

    from core.modelzoo import build_model

    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as tmp:
        tmp_path = Path(tmp)
        model_dir = args.model_dir or build_model(tmp_path / "model", preset=args.preset)
        print(f"model: {model_dir}", flush=True)
        prompts = build_prompts(Path(model_dir), args.prompts, args.seed)
        adapters = make_adapters(Path(model_dir), tmp_path, NUM_ADAPTERS, args.lora_b_scale)
        spec = {
            "model": str(model_dir),
            "prompts": prompts,
            "adapters": adapters,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
        }
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(json.dumps(spec))
        results = {}
        for fast in (True, False):
            label = "on" if fast else "off"
            print(f"vLLM worker, plugin {label} ...", flush=True)
            t0 = time.perf_counter()
            results[label] = spawn_worker(
                spec_path, tmp_path / f"vllm_{label}.json", fast, tmp_path / f"vllm_{label}.log"
            )
            print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        print("transformers + PEFT baseline ...", flush=True)
        hf = run_hf_peft(Path(model_dir), adapters, prompts, args.new_tokens, min(args.hf_requests, len(prompts)))

    res, lines = summarize(results["on"], results["off"], hf, args, len(prompts))
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not res["greedy_ids_on_equal_off"]:
        print("FAIL: greedy token ids differ between plugin ON and OFF", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
