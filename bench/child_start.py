"""Child start latency: queued -> first training step and queued -> first evaluation batch, cold vs warm children.

A cold child is a fresh `python -m worker.training ...` (it imports torch, transformers, peft and TRL first); a warm
one is forked from the worker's fork server (worker/forkserver.py), which has imported them once. Both modes run in
the same run on the same embedded stack kind (SQLite, Celery over SQLite, a real Celery worker process), one worker
per mode; each job trains 2 steps of the tiny model and each evaluation scores 8 examples. Times are measured from
the moment POST returned to the moment the API first shows progress (polled every 20 ms). The first job of each
worker is a warm-up and not counted (for the warm mode: the fork server's own preload).

    python -m bench.child_start [--repeats 3] [--out bench/results/child_start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from bench.processes import Proc
from core.demo_data import write_demo_dataset
from core.migrate import upgrade
from core.modelzoo import build_model
from core.processes import worker_command
from core.settings import Settings
from core.statuses import TERMINAL_STATUSES

POLL_SECONDS = 0.02
JOB = {"hyperparameters": {"max_steps": 2, "batch_size": 4}, "evaluation": {"enabled": False}}


def _first_seen(client: TestClient, path: str, seen: Any, timeout: float = 300) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if seen(client.get(path).json()):
            return time.perf_counter()
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"{path}: no progress in {timeout} s")


def _until_done(client: TestClient, path: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path).json()
        if body["status"] in TERMINAL_STATUSES:
            return body
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not finish in {timeout} s")


def _server_rss_mb(worker_pid: int) -> float | None:
    """Resident memory of the worker's fork server (the worker's child running worker.forkserver)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(status.split("PPid:")[1].split()[0])
        if ppid == worker_pid and b"worker.forkserver" in cmdline:
            return int(status.split("VmRSS:")[1].split()[0]) / 1024
    return None


def measure(mode: str, root: Path, model_dir: Path, train: Path, test: Path, repeats: int) -> dict[str, Any]:
    from api.main import create_app

    data_dir = root / mode
    settings = Settings(
        data_dir=data_dir,
        base_model=str(model_dir),
        queue_name=f"bench-child-start-{mode}",
        auth_enabled=False,
        event_every_steps=1,
        heartbeat_seconds=1.0,
        reconcile_interval_seconds=0,
        warm_children=mode == "warm",
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TUNESERVE_DATA_DIR=str(data_dir),
        TUNESERVE_BASE_MODEL=str(model_dir),
        TUNESERVE_QUEUE_NAME=settings.queue_name,
        TUNESERVE_HEARTBEAT_SECONDS="1.0",
        TUNESERVE_WARM_CHILDREN=str(mode == "warm").lower(),
        TUNESERVE_AUTH_ENABLED="false",
    )
    worker = Proc("worker", worker_command(settings.queue_name), env, data_dir / "worker.log")
    worker.start()
    first_step: list[float] = []
    first_batch: list[float] = []
    rss = None
    try:
        with TestClient(create_app(settings)) as client, train.open("rb") as f, test.open("rb") as t:
            dataset = client.post("/datasets", files={"file": ("train.jsonl", f), "test_file": ("test.jsonl", t)})
            assert dataset.status_code == 201, dataset.text
            dataset_id = dataset.json()["id"]
            for i in range(repeats + 1):
                response = client.post("/jobs", json={"dataset_id": dataset_id, **JOB})
                assert response.status_code == 201, response.text
                queued = time.perf_counter()
                path = f"/jobs/{response.json()['id']}"
                stepped = _first_seen(client, path, lambda j: j["progress"]["step"] > 0 or j["status"] == "failed")
                job = _until_done(client, path)
                assert job["status"] == "succeeded", job
                response = client.post(
                    "/evaluations",
                    json={"dataset_id": dataset_id, "max_examples": 8, "batch_size": 4, "max_new_tokens": 4},
                )
                assert response.status_code == 201, response.text
                queued_eval = time.perf_counter()
                path = f"/evaluations/{response.json()['id']}"
                batched = _first_seen(
                    client, path, lambda e: e["progress"]["done_examples"] > 0 or e["status"] == "failed"
                )
                evaluation = _until_done(client, path)
                assert evaluation["status"] == "succeeded", evaluation
                if i > 0:  # the first round warms the worker up
                    first_step.append(stepped - queued)
                    first_batch.append(batched - queued_eval)
            if mode == "warm":
                rss = _server_rss_mb(worker.pid)
    finally:
        worker.kill()
    return {
        "queued_to_first_step_s": statistics.median(first_step),
        "queued_to_first_eval_batch_s": statistics.median(first_batch),
        "runs_first_step_s": first_step,
        "runs_first_eval_batch_s": first_batch,
        "fork_server_rss_mb": rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/child_start.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-child-start-") as tmp:
        root = Path(tmp)
        model_dir = build_model(root / "models" / "tiny", preset="tiny", seed=0)
        train, test = write_demo_dataset(root / "demo", n_train=64, n_test=16, seed=0)
        report: dict[str, Any] = {
            "machine": {"cores": os.cpu_count(), "model": "tiny"},
            "date": time.strftime("%Y-%m-%d"),
            "repeats": args.repeats,
        }
        for mode in ("cold", "warm"):
            report[mode] = measure(mode, root, model_dir, train, test, args.repeats)
    cold, warm = report["cold"], report["warm"]
    report["child_start_s"] = warm["queued_to_first_step_s"]
    print(f"{'':32}{'cold':>10}{'warm':>10}{'cold/warm':>11}")
    for key, label in (("queued_to_first_step_s", "queued -> first training step"),
                       ("queued_to_first_eval_batch_s", "queued -> first eval batch")):  # fmt: skip
        print(f"{label:32}{cold[key]:>9.2f}s{warm[key]:>9.2f}s{cold[key] / warm[key]:>10.1f}x")
    if warm["fork_server_rss_mb"] is not None:
        print(f"fork server resident memory: {warm['fork_server_rss_mb']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
