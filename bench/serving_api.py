"""API overhead: `POST /generate` through the API vs the serving process vs the engine in-process.

Run from the repository root::

    HF_HUB_OFFLINE=1 python -m bench.serving_api --requests 100 --out bench/results/serving_api.json

Short greedy generations (max_tokens 8), one request at a time, so the figures are latency, not
throughput. Three paths, each with the base model and with one adapter:

- engine: the vLLM AsyncLLM in this process, called as serving calls it (serving.engine.Generation);
- serving: HTTP straight to `python -m serving` (one hop);
- api: HTTP to the API (`uvicorn api.main:create_app`), which checks SQL and proxies to serving (two hops).

The engine path runs alone first (with a second engine alive, the in-process one measured 3x slower
on 2 cores); then serving and api run together, interleaved request by request to share the same noise.
On a busy machine compare serving with api (same phase) rather than either with engine.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from serving.protocol import TOKEN_HEADER

PROMPT = {"messages": [{"role": "user", "content": "is this review good or bad: great fun"}]}
ADAPTER = "bench-adapter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(p99, 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
        "n": len(ordered),
    }


def make_adapter(settings: Any, name: str) -> None:
    """One random rank-8 all-linear LoRA (A and B random), saved as safetensors and registered in SQL."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.db import session_scope
    from core.models import DEFAULT_TENANT_ID, Adapter, AdapterStatus
    from core.repository import adapters as adapters_repo
    from core.storage import Store, hash_dir

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    )
    store = Store(settings)
    relative = store.adapter_dir(name)
    model.save_pretrained(str(store.resolve(relative)))
    files, size = hash_dir(store.resolve(relative))
    with session_scope(settings.database_url) as session:
        adapters_repo.add_adapter(
            session,
            Adapter(
                name=name,
                tenant_id=DEFAULT_TENANT_ID,
                base_model=settings.served_model_name,
                method="lora",
                rank=8,
                alpha=16.0,
                target_modules=targets,
                path=relative,
                files=files,
                size_bytes=size,
                status=AdapterStatus.ready,
            ),
        )


def mint_default_key(settings: Any) -> str:
    from core.auth import mint_key
    from core.db import session_scope

    with session_scope(settings.database_url) as session:
        return mint_key(session, "default", label="bench").secret


def wait_ready(url: str, process: subprocess.Popen[bytes], headers: dict[str, str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited with {process.returncode}")
        try:
            if httpx.get(url, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready in {timeout} s")


def start_processes(settings: Any, env: dict[str, str], api_port: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    """`python -m serving` and the API under uvicorn, as deployed."""
    procs = []
    with (logs / "serving.log").open("ab") as log:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "serving"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    with (logs / "api.log").open("ab") as log:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "api.main:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    wait_ready(f"{settings.serving_url}/health", procs[0], {TOKEN_HEADER: settings.serving_token})
    wait_ready(f"http://127.0.0.1:{api_port}/healthz", procs[1], {})
    return procs


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


async def timed(calls: dict[str, Any], requests: int) -> dict[str, dict[str, float]]:
    """Warm every path once, then call them in turn, request by request, so they share the same noise."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        await call()
    for _ in range(requests):
        for path, call in calls.items():
            t0 = time.perf_counter()
            await call()
            times[path].append((time.perf_counter() - t0) * 1000)
    return {path: percentiles(ms) for path, ms in times.items()}


def run_engine(settings: Any, requests: int, max_tokens: int) -> dict[str, dict[str, float]]:
    """The engine in this process, driven exactly as serving drives it (on uvloop, as under uvicorn)."""
    import uvloop
    from transformers import AutoTokenizer

    from serving.adapters import AdapterRegistry
    from serving.engine import Generation, build_engine
    from serving.protocol import ServingRequest

    engine = build_engine(settings)
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    gen = Generation(settings, engine, tokenizer, AdapterRegistry(settings, engine.add_lora, engine.remove_lora))

    async def run() -> dict[str, dict[str, float]]:
        async def call(label: str) -> None:
            req = ServingRequest(
                adapter=ADAPTER if label == "adapter" else None, temperature=0, max_tokens=max_tokens, **PROMPT
            )
            await gen.complete(await gen.prepare(req))

        timings = await timed({label: (lambda lb=label: call(lb)) for label in ("base", "adapter")}, requests)
        return timings

    try:
        return uvloop.run(run())
    finally:
        engine.shutdown()


def run_http(
    settings: Any, api_port: int, api_key: str, requests: int, max_tokens: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Serving direct and through the API (with a tenant's key, as a client calls it), interleaved request by request."""
    api_url = f"http://127.0.0.1:{api_port}"

    async def run() -> dict[str, dict[str, dict[str, float]]]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def serving_call(adapter: str | None) -> None:
                body = {**PROMPT, "temperature": 0, "max_tokens": max_tokens, "adapter": adapter}
                response = await client.post(
                    f"{settings.serving_url}/generate", json=body, headers={TOKEN_HEADER: settings.serving_token}
                )
                response.raise_for_status()

            async def api_call(adapter: str | None) -> None:
                body = {**PROMPT, "temperature": 0, "max_tokens": max_tokens}
                response = await client.post(
                    f"{api_url}/generate",
                    params={"adapter": adapter} if adapter else {},
                    json=body,
                    headers={"Authorization": f"Bearer {api_key}"},
                )
                response.raise_for_status()

            calls = {}
            for label, adapter in (("base", None), ("adapter", ADAPTER)):
                calls[f"serving/{label}"] = lambda a=adapter: serving_call(a)
                calls[f"api/{label}"] = lambda a=adapter: api_call(a)
            flat = await timed(calls, requests)
        results: dict[str, dict[str, dict[str, float]]] = {"serving": {}, "api": {}}
        for key, value in flat.items():
            path, label = key.split("/")
            results[path][label] = value
        return results

    return asyncio.run(run())


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving_api.json"))
    args = parser.parse_args()

    from core.migrate import upgrade
    from core.modelzoo import build_model
    from core.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-api-"))
    model = build_model(work / "models" / args.preset, preset=args.preset, seed=0)
    api_port = free_port()
    values: dict[str, Any] = {
        "data_dir": str(work),
        "base_model": str(model),
        "max_lora_rank": 8,
        "reconcile_interval_seconds": 0,
        "serving_port": free_port(),
        "serving_token": secrets.token_hex(8),
        "serving_dtype": "float32",
        "serving_max_model_len": 512,
        "serving_max_loras": 2,
        "serving_max_cpu_loras": 2,
    }
    settings = Settings(**values)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    make_adapter(settings, ADAPTER)
    api_key = mint_default_key(settings)
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()), **{f"TUNESERVE_{k.upper()}": str(v) for k, v in values.items()})

    # Never two engines at once: on a small CPU they skew each other's latency.
    results: dict[str, Any] = {"engine": run_engine(settings, args.requests, args.max_tokens)}
    procs = start_processes(settings, env, api_port, work)
    try:
        results.update(run_http(settings, api_port, api_key, args.requests, args.max_tokens))
    finally:
        stop_processes(procs)

    print(
        f"\n/generate latency, {args.requests} sequential requests, max_tokens={args.max_tokens}, "
        f"preset={args.preset}\n"
    )
    print(f"{'path':<10}{'model':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'p50 vs engine':>15}")
    for path in ("engine", "serving", "api"):
        for label in ("base", "adapter"):
            r = results[path][label]
            extra = r["p50_ms"] - results["engine"][label]["p50_ms"]
            print(f"{path:<10}{label:<10}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['mean_ms']:>10.2f}{extra:>+14.2f}")
    overhead = {
        label: round(results["api"][label]["p50_ms"] - results["serving"][label]["p50_ms"], 2)
        for label in ("base", "adapter")
    }
    print(f"\nAPI hop over serving direct (p50): {overhead}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "serving_api",
                "preset": args.preset,
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
                "results": results,
                "api_over_serving_p50_ms": overhead,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps the child from re-running main
    main()
