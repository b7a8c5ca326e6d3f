"""The embedded demo: a tiny model and a task, api + worker + serving on SQLite, fine-tune, evaluate, generate.

Run with `make demo`. Every process it starts is stopped on success, failure or Ctrl-C; with `make demo KEEP=1`
(TUNESERVE_DEMO_KEEP=1) the stack stays up at the end, with the web console's URL printed, until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from core.demo_data import write_demo_dataset
from core.migrate import upgrade
from core.modelzoo import build_model
from core.processes import (
    api_command,
    serving_command,
    start_in_own_group,
    stop_process_group,
    worker_command,
)
from core.settings import Settings
from core.statuses import TERMINAL_STATUSES

ROOT = Path(__file__).resolve().parent.parent
API_PORT = int(os.environ.get("TUNESERVE_DEMO_PORT", "8765"))
API_URL = f"http://127.0.0.1:{API_PORT}"
KEEP = os.environ.get("TUNESERVE_DEMO_KEEP", "") not in ("", "0", "false", "no")
DEMO_HYPERPARAMETERS = {"max_steps": 300, "learning_rate": 3e-3, "batch_size": 16, "lora_r": 8, "lora_alpha": 16}


class Processes:
    """Child processes started by the demo, each in its own process group so nothing outlives it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}.log"
        log.unlink(missing_ok=True)  # this run's output only
        # however the demo ends, its worker, serving and API end with it
        child = start_in_own_group(args, env=env, log=log, cwd=ROOT)
        self.children.append((name, child))
        return child

    def check_alive(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                raise RuntimeError(f"{name} exited with {child.returncode}; see {self.log_dir / (name + '.log')}")

    def stop_all(self) -> None:
        for _name, child in reversed(self.children):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for name, child in reversed(self.children):
            stop_process_group(child, grace=20)
            print(f"  stopped {name} (pid {child.pid})")


@contextmanager
def managed(log_dir: Path) -> Iterator[Processes]:
    processes = Processes(log_dir)

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield processes
    finally:
        print("cleaning up:")
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def wait_until(check, *, timeout: float, processes: Processes, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check_alive()
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _serving_up(client: httpx.Client) -> bool:
    return client.get("/v1/models").status_code == 200


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TUNESERVE_DATA_DIR", str(ROOT / "var" / "demo"))
    # The one place auth is off: a single-user demo on loopback, where everything is the default tenant's.
    os.environ.setdefault("TUNESERVE_AUTH_ENABLED", "false")
    settings = Settings()
    settings.ensure_dirs()
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    print(f"== tuneserve embedded demo (data in {settings.data_dir})")
    model_dir = build_model(Path(settings.base_model), preset="tiny", seed=0)
    train_file, test_file = write_demo_dataset(settings.data_dir / "demo-task", n_train=512, n_test=64, seed=0)
    upgrade(settings.database_url)
    print(f"  base model: {model_dir}\n  database:   {settings.database_url}\n  broker:     {settings.broker_url}")

    env = dict(os.environ, PYTHONPATH=str(ROOT), TUNESERVE_BASE_MODEL=str(model_dir))
    with managed(log_dir) as processes:
        processes.start("worker", worker_command(settings.queue_name), env)
        processes.start("serving", serving_command(), env)
        processes.start("api", api_command(API_PORT), env)
        with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=120) as client:
            wait_until(lambda: _ready(client), timeout=60, processes=processes, what="api readiness")
            print(f"  api ready on {API_URL} (docs at {API_URL}/docs); serving (vLLM) is starting")
            print(f"  web console: {API_URL}/ui (auth is off in the demo: no key needed)")
            adapter = run_story(client, processes, train_file, test_file)
            wait_until(lambda: _serving_up(client), timeout=300, processes=processes, what="serving readiness")
            show_generations(client, adapter, test_file)
            if KEEP:
                keep_running(processes, adapter)
            else:
                print(f"\n(`make demo KEEP=1` keeps the stack up at the end, to open the console at {API_URL}/ui)")
    return 0


def keep_running(processes: Processes, adapter: str) -> None:
    """Leave api, worker and serving up for a person to look around in the console; Ctrl-C stops them."""
    print(f"\n== the stack stays up (KEEP=1). Open the web console: {API_URL}/ui")
    print(f"  the demo job and its before/after report are under Jobs; chat with {adapter} under Playground")
    print(f"  API docs: {API_URL}/docs. Ctrl-C stops everything.")
    while True:
        processes.check_alive()
        time.sleep(2)


def run_story(client: httpx.Client, processes: Processes, train_file: Path, test_file: Path) -> str:
    with train_file.open("rb") as f, test_file.open("rb") as t:
        response = client.post("/datasets", files={"file": ("train.jsonl", f), "test_file": ("test.jsonl", t)})
    response.raise_for_status()
    dataset = response.json()
    print(f"\n== dataset {dataset['id']}: {dataset['format']}, splits {dataset['splits']}")

    submitted_at = time.monotonic()
    response = client.post(
        "/jobs", json={"dataset_id": dataset["id"], "suffix": "demo", "hyperparameters": DEMO_HYPERPARAMETERS}
    )
    response.raise_for_status()
    job = response.json()
    print(
        f"== job {job['id']} {job['status']}: lora r={DEMO_HYPERPARAMETERS['lora_r']}, {DEMO_HYPERPARAMETERS['max_steps']} steps"
    )

    def finished():
        current = client.get(f"/jobs/{job['id']}").json()
        progress = current["progress"]
        loss = current["last_loss"]
        print(
            f"\r  {current['status']:<10} step {progress['step']:>4}/{progress['total_steps'] or '?':<4} "
            f"loss {loss if loss is None else round(loss, 4)!s:<8} eta {progress['eta_seconds'] or '-'}s   ",
            end="",
            flush=True,
        )
        return current if current["status"] in TERMINAL_STATUSES else None

    job = wait_until(finished, timeout=1800, processes=processes, what="training")
    print(f"\n  {job['status']} in {time.monotonic() - submitted_at:.1f}s from POST /jobs")
    if job["status"] != "succeeded":
        raise RuntimeError(f"job ended {job['status']}: {job['error']}")
    adapter = client.get(f"/adapters/{job['fine_tuned_model']}").json()
    print(
        f"\n== adapter {adapter['name']} (rank {adapter['rank']}, alpha {adapter['alpha']}, {adapter['size_bytes']} bytes)"
    )
    for name, digest in adapter["files"].items():
        print(f"  {name:<28} sha256 {digest[:16]}...")

    print("\n== before / after on the held-out test split (the worker evaluates base and adapter)")

    def evaluated():
        report = client.get(f"/jobs/{job['id']}/report").json()
        return report if report["evaluation"]["status"] in ("succeeded", "failed", "none") else None

    report = wait_until(evaluated, timeout=900, processes=processes, what="evaluation")
    if report["evaluation"]["status"] != "succeeded":
        raise RuntimeError(f"evaluation ended {report['evaluation']['status']}")
    print(f"  {report['n_examples']} examples never trained on")
    print(f"  {'metric':<14} {'base':>8} {'adapter':>8} {'delta':>8}")
    for m in report["metrics"]:
        print(f"  {m['name']:<14} {m['base']:>8.3f} {m['adapter']:>8.3f} {m['delta']:>+8.3f}")
    return str(adapter["name"])


def show_generations(client: httpx.Client, adapter: str, test_file: Path) -> None:
    """The same held-out questions through serving, without and with the adapter (greedy)."""
    print("\n== generation through serving (vLLM, adapter hot-loaded), greedy")
    rows = [json.loads(line) for line in test_file.read_text().splitlines()[:4]]
    for row in rows:
        messages = row["messages"][:-1]
        answers = []
        for name in (None, adapter):
            params = {"adapter": name} if name else {}
            response = client.post(
                "/generate", params=params, json={"messages": messages, "max_tokens": 8, "temperature": 0}
            )
            response.raise_for_status()
            answers.append(response.json()["text"].strip())
        print(f"  {messages[-1]['content'][:60]:<60}")
        print(f"      expected {row['messages'][-1]['content']!r:<12} base {answers[0]!r:<24} adapter {answers[1]!r}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted")
        sys.exit(130)
