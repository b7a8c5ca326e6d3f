"""API overhead: vLLM's OpenAI server (`python -m serving`) called directly vs through the API's pass-through.

Run from the repository root, holding the lock the test runs hold (2 cores are shared)::

    flock /tmp/tuneserve-pytest.lock .venv/bin/python -m bench.serving_api --out bench/results/serving_api.json

Two processes as deployed: serving (vLLM's OpenAI server, tuneserve's registry resolver and token guard) and the API
under uvicorn, on SQLite (`--database postgres`: a temporary Postgres database), with the tiny model built by
core.modelzoo and one random rank-8 LoRA registered like a trained one. Each row runs with the base model and with
the adapter:

1. latency: short greedy chat completions (max_tokens 8), one request at a time: serving's /v1/chat/completions
   with the serving token (direct), the API's /v1/chat/completions with a tenant key (api), and the API's
   /generate, interleaved request by request so that all share the same noise. The API's added p50 is api - direct.
2. streams: 32 concurrent streamed chat completions (max_tokens 32, ignore_eos: 32 tokens each), kept 32 in flight,
   direct and through the API in alternating rounds (direct, api, api, direct, ...): requests/s and the p99 of a
   request's whole time (to its last event); the ratio api/direct. Each round's requests/s is kept: on a busy
   machine rounds of one path differ widely, and the spread says how far to trust the ratio.

On 2 cores the client, the API and vLLM's two processes share the CPU: the API's cost is partly CPU taken from
the engine, which is what a deployment on a small machine pays too.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from bench.processes import ROOT, Proc, create_database, drop_database, sqlalchemy_url
from core.processes import api_command, free_port
from core.serving_contract import CHAT_COMPLETIONS_PATH, HEALTH_PATH, TOKEN_HEADER

MESSAGES = [{"role": "user", "content": "is this review good or bad: great fun"}]
ADAPTER = "bench-adapter"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = ("base", "adapter")
# The targets (issue 13, Benchmarks).
MAX_ADDED_P50_MS = 5.0
MIN_STREAM_RATIO = 0.9


@dataclass(frozen=True)
class Endpoint:
    """Where a path sends a chat completion, with which credentials, and the model name for base and adapter."""

    url: str
    headers: dict[str, str]
    base_model: str


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
    """One random rank-8 LoRA (A and B random), saved into the store and registered with its files' sha256, as a
    training job registers one (tests/support/generation.py make_adapter does the same)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.db import session_scope
    from core.models import DEFAULT_TENANT_ID, Adapter, AdapterStatus
    from core.repository import adapters as adapters_repo
    from core.storage import Store, hash_dir

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    store = Store(settings)
    relative = store.adapter_dir(name)
    directory = store.resolve(relative)
    model.save_pretrained(str(directory))
    for extra in directory.iterdir():  # only what serving needs; README.md is PEFT's model card
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    files, size = hash_dir(directory)
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
                target_modules=TARGETS,
                path=relative,
                files=files,
                size_bytes=size,
                status=AdapterStatus.ready,
                servable=True,
            ),
        )


def mint_api_key(settings: Any) -> str:
    """A key of the default tenant, minted as `tuneserve admin create-key` does."""
    from core.auth import mint_key
    from core.db import session_scope

    with session_scope(settings.database_url) as session:
        return mint_key(session, "default", label="bench").secret


def wait_ready(url: str, proc: Proc, headers: dict[str, str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"{proc.name} exited; log: {proc.log}")
        try:
            if httpx.get(url, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready in {timeout} s; log: {proc.log}")


def chat_body(endpoint: Endpoint, model: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": endpoint.base_model if model == "base" else ADAPTER,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if stream:
        body.update(stream=True, ignore_eos=True)  # every stream the same length: the same work on both paths
    return body


async def post_ok(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any], **kw: Any
) -> None:
    response = await client.post(url, json=body, headers=headers, **kw)
    if response.status_code != 200:
        raise SystemExit(f"{url}: {response.status_code} {response.text[:500]}")


async def latency_row(
    client: httpx.AsyncClient, direct: Endpoint, api: Endpoint, requests: int, max_tokens: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Direct, api and /generate, base and adapter, called in turn request by request (each warmed once first)."""
    generate_url = api.url.removesuffix(CHAT_COMPLETIONS_PATH) + "/generate"
    calls: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {}
    for model in MODELS:
        for path, endpoint in (("direct", direct), ("api", api)):
            body = chat_body(endpoint, model, max_tokens, stream=False)
            calls[path, model] = partial(post_ok, client, endpoint.url, endpoint.headers, body)
        params = {"adapter": ADAPTER} if model == "adapter" else {}
        body = {"messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens}
        calls["generate", model] = partial(post_ok, client, generate_url, api.headers, body, params=params)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for call in calls.values():
        await call()
    for _ in range(requests):
        for key, call in calls.items():
            t0 = time.perf_counter()
            await call()
            times[key].append((time.perf_counter() - t0) * 1000)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (path, model), ms in times.items():
        out.setdefault(path, {})[model] = percentiles(ms)
    return out


@dataclass
class Streams:
    """What the streams of one path and model gave: each stream's total and first-event ms, each round's req/s."""

    total_ms: list[float] = field(default_factory=list)
    first_event_ms: list[float] = field(default_factory=list)
    events: set[int] = field(default_factory=set)
    rounds_req_per_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "req_per_s": round(len(self.total_ms) / self.wall_s, 2),
            **percentiles(self.total_ms),
            "first_event_p50_ms": round(statistics.median(self.first_event_ms), 2),
            "rounds_req_per_s": self.rounds_req_per_s,
            "events_per_stream": sorted(self.events),
        }


async def one_stream(client: httpx.AsyncClient, endpoint: Endpoint, body: dict[str, Any], into: Streams) -> None:
    """One streamed completion read to its `[DONE]`: its time to the first event and to the end."""
    t0 = time.perf_counter()
    first, events, done = 0.0, 0, False
    async with client.stream("POST", endpoint.url, json=body, headers=endpoint.headers) as response:
        if response.status_code != 200:
            await response.aread()
            raise SystemExit(f"{endpoint.url}: {response.status_code} {response.text[:500]}")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events += 1
                first = first or time.perf_counter()
                done = line == "data: [DONE]"
    if not done:
        raise SystemExit(f"{endpoint.url}: a stream ended without [DONE]")
    into.total_ms.append((time.perf_counter() - t0) * 1000)
    into.first_event_ms.append((first - t0) * 1000)
    into.events.add(events)


async def stream_round(
    client: httpx.AsyncClient, endpoint: Endpoint, body: dict[str, Any], concurrency: int, total: int, into: Streams
) -> None:
    """`total` streams, `concurrency` in flight at all times."""
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one_stream(client, endpoint, body, into)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    into.wall_s += seconds
    into.rounds_req_per_s.append(round(total / seconds, 2))


async def streams_row(
    client: httpx.AsyncClient, direct: Endpoint, api: Endpoint, args: argparse.Namespace
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model: one warm-up round each, then rounds in the order direct, api, api, direct, ... (drift in the
    machine's load falls on both paths alike)."""
    concurrency, per_round = args.concurrency, args.stream_requests
    out: dict[str, dict[str, dict[str, Any]]] = {"direct": {}, "api": {}}
    endpoints = {"direct": direct, "api": api}
    for model in MODELS:
        bodies = {path: chat_body(e, model, args.stream_max_tokens, stream=True) for path, e in endpoints.items()}
        for path, endpoint in endpoints.items():
            await stream_round(client, endpoint, bodies[path], concurrency, concurrency, Streams())
        measured = {path: Streams() for path in endpoints}
        for i in range(2 * args.stream_rounds):
            path = ("direct", "api", "api", "direct")[i % 4]
            await stream_round(client, endpoints[path], bodies[path], concurrency, per_round, measured[path])
        for path in endpoints:
            out[path][model] = measured[path].summary()
    return out


async def measure(
    settings: Any, api_port: int, api_key: str, args: argparse.Namespace
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    direct = Endpoint(
        f"{settings.serving_url}{CHAT_COMPLETIONS_PATH}",
        {TOKEN_HEADER: settings.serving_token},
        settings.served_model_name,
    )
    api = Endpoint(
        f"http://127.0.0.1:{api_port}{CHAT_COMPLETIONS_PATH}",
        {"Authorization": f"Bearer {api_key}"},
        settings.served_model_name,
    )
    connections = 2 * args.concurrency
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        latency = await latency_row(client, direct, api, args.requests, args.max_tokens)
        streams = await streams_row(client, direct, api, args)
    return {"latency": latency, "streams": streams}


def run_client(coro: Awaitable[Any]) -> Any:
    """On uvloop when it is there (vLLM brings it): the client's own overhead is CPU taken from the servers."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def report(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    latency, streams = results["latency"], results["streams"]
    print(
        f"\n1. latency: {args.requests} sequential chat completions per path, max_tokens={args.max_tokens}, "
        f"preset={args.preset}, database={args.database}\n"
    )
    print(f"{'path':<10}{'model':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'p50 - direct':>15}")
    for path in ("direct", "api", "generate"):
        for model in MODELS:
            r = latency[path][model]
            added = r["p50_ms"] - latency["direct"][model]["p50_ms"]
            print(f"{path:<10}{model:<10}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['mean_ms']:>10.2f}{added:>+15.2f}")
    added_p50 = {m: round(latency["api"][m]["p50_ms"] - latency["direct"][m]["p50_ms"], 2) for m in MODELS}
    print(
        f"\n2. streams: {args.concurrency} concurrent streamed chat completions, max_tokens={args.stream_max_tokens}, "
        f"{args.stream_rounds} rounds of {args.stream_requests} per path and model\n"
    )
    print(f"{'path':<10}{'model':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'1st event':>11}  rounds req/s")
    for path in ("direct", "api"):
        for model in MODELS:
            r = streams[path][model]
            print(
                f"{path:<10}{model:<10}{r['req_per_s']:>10.2f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
                f"{r['first_event_p50_ms']:>11.2f}  {r['rounds_req_per_s']}"
            )
    ratio = {
        m: {
            "req_per_s": round(streams["api"][m]["req_per_s"] / streams["direct"][m]["req_per_s"], 3),
            "p99": round(streams["direct"][m]["p99_ms"] / streams["api"][m]["p99_ms"], 3),
        }
        for m in MODELS
    }
    targets = {
        "api_added_p50_ms": {"max": MAX_ADDED_P50_MS, "met": all(v <= MAX_ADDED_P50_MS for v in added_p50.values())},
        "streams_ratio": {
            "min": MIN_STREAM_RATIO,
            "met": all(v >= MIN_STREAM_RATIO for r in ratio.values() for v in r.values()),
        },
    }
    print(f"\nAPI's added p50 over direct (target <= {MAX_ADDED_P50_MS} ms): {added_p50}")
    print(f"streams api/direct (req/s, and direct p99 / api p99; target >= {MIN_STREAM_RATIO}): {ratio}")
    return {"api_added_p50_ms": added_p50, "streams_ratio_api_over_direct": ratio, "targets": targets}


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--requests", type=int, default=60, help="sequential requests per path and model")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stream-requests", type=int, default=32, help="streams per round")
    parser.add_argument("--stream-rounds", type=int, default=4, help="rounds per path and model")
    parser.add_argument("--stream-max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving_api.json"))
    args = parser.parse_args()

    from core.migrate import upgrade
    from core.modelzoo import build_model
    from core.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-api-"))
    pg_name = None
    procs: list[Proc] = []
    finished = False
    try:
        model = build_model(work / "models" / args.preset, preset=args.preset, seed=0)
        api_port = free_port()
        values: dict[str, Any] = {
            "data_dir": str(work),
            "base_model": str(model),
            "reconcile_interval_seconds": 0,
            "serving_port": free_port(),
            "serving_token": secrets.token_hex(8),
            "serving_dtype": "float32",
            "serving_max_model_len": 512,
            "serving_max_tokens": 256,
            "serving_max_num_seqs": max(32, args.concurrency),
            "max_lora_rank": 8,
            "serving_max_loras": 2,
            "serving_max_cpu_loras": 2,
            "max_concurrent_generations_per_tenant": max(32, args.concurrency),
        }
        if args.database == "postgres":
            pg_name, pg_url = create_database("tuneserve_bench_api")
            values["database_url"] = sqlalchemy_url(pg_url)
        settings = Settings(**values)
        settings.ensure_dirs()
        upgrade(settings.database_url)
        make_adapter(settings, ADAPTER)
        api_key = mint_api_key(settings)
        env = dict(os.environ, PYTHONPATH=str(ROOT), **{f"TUNESERVE_{k.upper()}": str(v) for k, v in values.items()})
        serving = Proc("serving", [sys.executable, "-m", "serving"], env, work / "serving.log")
        api = Proc("api", api_command(api_port, log_level="warning"), env, work / "api.log")
        procs = [serving, api]
        for proc in procs:
            proc.start()
        wait_ready(f"{settings.serving_url}{HEALTH_PATH}", serving, {TOKEN_HEADER: settings.serving_token})
        wait_ready(f"http://127.0.0.1:{api_port}/healthz", api, {})
        results = run_client(measure(settings, api_port, api_key, args))
        finished = True
    finally:
        for proc in reversed(procs):
            proc.kill()
        if pg_name is not None:
            drop_database(pg_name)
        if finished:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (serving.log, api.log)", file=sys.stderr)

    summary = report(args, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("preset", "database", "requests", "max_tokens", "concurrency")}
    config.update(
        stream_rounds=args.stream_rounds,
        stream_requests_per_round=args.stream_requests,
        stream_max_tokens=args.stream_max_tokens,
    )
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "serving_api",
                **config,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
                "results": results,
                **summary,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
