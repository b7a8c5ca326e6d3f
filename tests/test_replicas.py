"""Serving replicas and the API in front of them: adapter affinity by rendezvous hashing, failover when a replica
dies, 503 with Retry-After only when none answers, and no database connection held while generations stream."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from api.services.serving_client import replica_order
from core.migrate import upgrade
from core.settings import Settings
from tests.support.aio import run_async
from tests.support.databases import drop_pg_database
from tests.support.generation import PROMPTS, Reference, make_adapter, unique
from tests.support.http import api_server, assert_error
from tests.support.paths import PG_ADMIN_URL
from tests.support.processes import free_port, stop_process_group
from tests.support.serving import ServingProcess
from tests.support.stack import Stack, bearer, mint_api_key, stack_settings


@pytest.fixture(scope="module")
def second_replica(serving_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingProcess]:
    """A second `python -m serving` on the same registry and store (the session's first one is the other)."""
    primary: ServingProcess = serving_stack.extra["serving"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**primary.env, "TUNESERVE_SERVING_PORT": str(port), "TUNESERVE_SERVING_URL": url}
    replica = ServingProcess(
        url=url, token=primary.token, env=env, log=tmp_path_factory.mktemp("replica") / "serving.log"
    )
    replica.start()
    try:
        yield replica
    finally:
        stop_process_group(replica.process)


def _name_first_on(urls: list[str], url: str) -> str:
    return next(n for n in (unique("aff") for _ in range(256)) if replica_order(urls, n)[0] == url)


def _generate(client: TestClient, adapter: str | None) -> Any:
    params = {"adapter": adapter} if adapter else {}
    return client.post("/generate", params=params, json={**PROMPTS[1], "temperature": 0, "max_tokens": 6})


def _requests_served(replica: ServingProcess) -> float:
    return replica.metric("vllm:request_success")


def test_adapters_stay_on_their_replica_and_fail_over_when_it_dies(
    serving_stack: Stack, second_replica: ServingProcess, model_dir: Path
) -> None:
    primary: ServingProcess = serving_stack.extra["serving"]
    urls = [primary.url, second_replica.url]
    reference = Reference(model_dir)
    on_second, on_primary = _name_first_on(urls, second_replica.url), _name_first_on(urls, primary.url)
    for i, name in enumerate((on_second, on_primary)):
        make_adapter(serving_stack, reference, name, seed=60 + i)
    settings = serving_stack.settings.model_copy(update={"serving_urls": ",".join(urls)})
    with TestClient(create_app_for(settings), headers=bearer(serving_stack.api_key)) as client:
        answers: dict[str, list[int]] = {}
        for name in (on_second, on_primary, on_second, on_primary, on_second):
            response = _generate(client, name)
            assert response.status_code == 200, response.text
            assert answers.setdefault(name, response.json()["token_ids"]) == response.json()["token_ids"]
        # Each adapter was loaded by its own replica only: it stays hot there.
        assert on_second in second_replica.loaded_adapters() and on_second not in primary.loaded_adapters()
        assert on_primary in primary.loaded_adapters() and on_primary not in second_replica.loaded_adapters()

        # The base model has no affinity: it spreads over both.
        before = [_requests_served(primary), _requests_served(second_replica)]
        for _ in range(12):
            assert _generate(client, None).status_code == 200
        after = [_requests_served(primary), _requests_served(second_replica)]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

        # The second replica dies: its adapter moves to the next replica in its order, same answer; others unmoved.
        stop_process_group(second_replica.process)
        moved = _generate(client, on_second)
        assert moved.status_code == 200, moved.text
        assert moved.json()["token_ids"] == answers[on_second]
        assert on_second in primary.loaded_adapters()
        assert _generate(client, on_primary).json()["token_ids"] == answers[on_primary]
        for _ in range(4):
            assert _generate(client, None).status_code == 200


def create_app_for(settings: Settings) -> Any:
    from api.main import create_app

    return create_app(settings)


def test_no_replica_answering_is_503_with_retry_after(serving_stack: Stack) -> None:
    down = ",".join(f"http://127.0.0.1:{free_port()}" for _ in range(2))
    settings = serving_stack.settings.model_copy(update={"serving_urls": down, "reconcile_interval_seconds": 0})
    with TestClient(create_app_for(settings), headers=bearer(serving_stack.api_key)) as client:
        for response in (
            _generate(client, None),
            client.post(
                "/v1/chat/completions", json={"model": settings.served_model_name, **PROMPTS[1], "stream": True}
            ),
        ):
            assert_error(response, 503, None, "unavailable")
            assert int(response.headers["Retry-After"]) >= 1


def _in_transaction(database: str) -> int:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
            (database,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_32_slow_streams_hold_no_database_connection_while_light_routes_answer(
    serving_stack: Stack, tmp_path: Path, model_dir: Path, demo_files: tuple[Path, Path]
) -> None:
    """On Postgres (a real pool of 15): 32 clients read their streams slowly; meanwhile GET /jobs/{id} answers
    quickly, no request times out waiting for a connection, and no connection sits idle in a transaction."""
    primary: ServingProcess = serving_stack.extra["serving"]
    settings, databases = stack_settings(
        "postgres",
        tmp_path,
        model_dir,
        serving_url=primary.url,
        serving_token=primary.token,
        serving_max_tokens=serving_stack.settings.serving_max_tokens,
        serving_max_model_len=serving_stack.settings.serving_max_model_len,
        reconcile_interval_seconds=0,
    )
    try:
        upgrade(settings.database_url)
        key = mint_api_key(settings)
        with api_server(settings) as url:
            run_async(_slow_streams_beside_light_routes(url, key, settings, databases[0], demo_files[0]))
    finally:
        for name in databases:
            drop_pg_database(name)


async def _slow_streams_beside_light_routes(url: str, key: str, settings: Settings, database: str, train: Path) -> None:
    async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=120) as http:
        dataset = await http.post("/datasets", files={"file": ("train.jsonl", train.read_bytes())})
        assert dataset.status_code == 201, dataset.text
        job = await http.post("/jobs", json={"dataset_id": dataset.json()["id"], "hyperparameters": {"max_steps": 1}})
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        body = {
            "model": settings.served_model_name,
            "prompt": PROMPTS[0]["prompt"],
            "max_tokens": 64,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        opened = 0
        done = asyncio.Event()

        async def slow_reader() -> tuple[int, int]:
            """The tokens relayed (summed over the events' token ids) and the engine's own count. vLLM merges
            deltas for a reader slower than the engine (its RequestOutputCollector), so events may be fewer than
            tokens: what must hold is that every token arrives."""
            nonlocal opened
            relayed, counted = 0, -1
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                opened += 1
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line.removeprefix("data: "))
                        relayed += sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
                        if chunk.get("usage"):
                            counted = chunk["usage"]["completion_tokens"]
                        await asyncio.sleep(0.05)  # a slow client: about 3 s for the whole stream
            return relayed, counted

        async def light_routes() -> list[float]:
            while opened < 32:
                await asyncio.sleep(0.02)
            timings = []
            in_transaction = []
            while not done.is_set():
                started = time.perf_counter()
                response = await http.get(f"/jobs/{job_id}")
                timings.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                in_transaction.append(await asyncio.to_thread(_in_transaction, database))
                await asyncio.sleep(0.05)
            assert max(in_transaction) == 0, in_transaction
            return timings

        light = asyncio.create_task(light_routes())
        events = await asyncio.gather(*(slow_reader() for _ in range(32)))
        done.set()
        timings = await light
        assert all(relayed == counted == 64 for relayed, counted in events), sorted(events)
        assert len(timings) >= 5 and max(timings) < 2.0, timings
        print(f"GET /jobs/{{id}} beside 32 slow streams: n={len(timings)} max={max(timings) * 1000:.0f} ms")


def test_serving_urls_setting_lists_replicas(tmp_path: Path) -> None:
    one = Settings(data_dir=tmp_path, serving_url="http://a:1/")
    assert one.serving_url_list == ["http://a:1"]
    many = Settings(data_dir=tmp_path, serving_urls=" http://a:1, http://b:2/ ,")
    assert many.serving_url_list == ["http://a:1", "http://b:2"]
    names = [secrets.token_hex(4) for _ in range(200)]
    firsts = [replica_order(many.serving_url_list, n)[0] for n in names]
    # Deterministic per name, and spread over both replicas.
    assert firsts == [replica_order(many.serving_url_list, n)[0] for n in names]
    assert 60 < firsts.count("http://a:1") < 140
    # Removing a replica moves only the names that were on it (rendezvous hashing's point).
    survivors = [replica_order(["http://a:1"], n)[0] for n in names]
    assert all(s == f for s, f in zip(survivors, firsts, strict=True) if f == "http://a:1")
