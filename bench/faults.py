"""Random fault injection over a real stack: nothing lost, stuck, duplicated or orphaned.

    python -m bench.faults [--jobs 12] [--faults 20] [--seed 0] [--out bench/results/faults.json]

Starts Postgres-backed tuneserve as real processes (the API under uvicorn, a Celery worker, a private
redis-server on a free port), submits --jobs small training jobs over time (a client that retries with its
Idempotency-Key, as a real one would), and meanwhile injects --faults random faults, each at a random moment:
SIGKILL of the worker, of a training child or of the API (each restarted), a Redis restart (losing every
message), and a dropped database connection (pg_terminate_backend of every session of the stack).
Then it waits for every job to end and counts, all of which must be 0:

    jobs lost          accepted (2xx) but no row
    jobs stuck         not terminal when the deadline passed
    duplicate adapters a job with more than one adapter row or success event
    orphan files       staging leftovers, store directories no row points at, checkpoints of ended jobs
    orphan rows        adapter rows whose files are missing or differ from their sha256, succeeded jobs without one

Jobs that failed (their attempts used up by repeated kills) are reported, not counted as errors.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.processes import PG_ADMIN_URL, ROOT, Proc, create_database, drop_database, redis_command, sqlalchemy_url
from core.processes import api_command, free_port, worker_command
from core.statuses import TERMINAL_STATUSES

FAULTS = ("kill_worker", "kill_child", "kill_api", "restart_redis", "drop_db_connections")
TERMINAL = TERMINAL_STATUSES


class Bench:
    def __init__(self, work: Path, seed: int) -> None:
        from core.demo_data import write_demo_dataset
        from core.migrate import upgrade
        from core.modelzoo import build_model

        self.work = work
        self.rng = random.Random(seed)
        model = build_model(work / "model", preset="tiny", seed=0)
        self.train_file, _ = write_demo_dataset(work / "demo", n_train=128, n_test=16, seed=0)
        self.db_name, self.pg_url = create_database("tuneserve_faults")
        self.database_url = sqlalchemy_url(self.pg_url)
        self.redis_port, self.api_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "TUNESERVE_DATA_DIR": str(work / "data"),
            "TUNESERVE_DATABASE_URL": self.database_url,
            "TUNESERVE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "TUNESERVE_BASE_MODEL": str(model),
            "TUNESERVE_QUEUE_NAME": "faults",
            "TUNESERVE_AUTH_ENABLED": "false",
            "TUNESERVE_LEASE_SECONDS": "6",
            "TUNESERVE_HEARTBEAT_SECONDS": "1",
            "TUNESERVE_CANCEL_GRACE_SECONDS": "5",
            "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "1",
            "TUNESERVE_REQUEUE_AFTER_SECONDS": "3",
            "TUNESERVE_MAX_ATTEMPTS": "5",
            "TUNESERVE_SWEEP_MIN_AGE_SECONDS": "5",
            "TUNESERVE_SWEEP_INTERVAL_SECONDS": "2",
            "TUNESERVE_EVENT_EVERY_STEPS": "2",
        }
        upgrade(self.database_url)
        logs = work / "logs"
        logs.mkdir()
        self.redis = Proc("redis", redis_command(self.redis_port), self.env, logs / "redis.log")
        self.api = Proc("api", api_command(self.api_port, log_level="warning"), self.env, logs / "api.log")
        self.worker = Proc("worker", worker_command("faults"), self.env, logs / "worker.log")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30)
        self.injected: list[dict[str, Any]] = []

    # --- the stack ---
    def start(self) -> None:
        self.redis.start()
        self.wait(
            lambda: (
                subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"], capture_output=True).stdout.strip()
                == b"PONG"
            ),
            15,
            "redis",
        )
        self.start_api()
        self.worker.start()

    def start_api(self) -> None:
        self.api.start()
        self.wait(self.api_answers, 60, "the API")

    def api_answers(self) -> bool:
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        for proc in (self.worker, self.api, self.redis):
            proc.kill(signal.SIGTERM)
        self.client.close()
        drop_database(self.db_name)

    @staticmethod
    def wait(predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come up in {timeout} s")
            time.sleep(0.2)

    # --- a client that retries, as a real one does ---
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + 90
        while True:
            try:
                response = self.client.request(method, path, **kwargs)
                if response.status_code < 500:
                    return response
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path} kept failing")
            time.sleep(0.5)

    def upload(self) -> str:
        key = str(uuid.uuid4())
        response = self.request(
            "POST",
            "/datasets",
            files={"file": ("train.jsonl", self.train_file.read_bytes())},
            headers={"Idempotency-Key": key},
        )
        response.raise_for_status()
        return str(response.json()["id"])

    def submit(self, dataset_id: str) -> str:
        body = {
            "dataset_id": dataset_id,
            "evaluation": {"enabled": False},
            "hyperparameters": {
                "max_steps": self.rng.choice([8, 12, 16]),
                "checkpoint_every_steps": 4,
                "batch_size": 8,
                "learning_rate": 1e-3,
            },
        }
        response = self.request("POST", "/jobs", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        response.raise_for_status()
        return str(response.json()["id"])

    # --- faults ---
    def inject(self, fault: str) -> None:
        started = time.monotonic()
        if fault == "kill_worker":
            self.worker.kill(signal.SIGKILL)
            time.sleep(0.5)
            self.worker.start()
        elif fault == "kill_child":
            pids = subprocess.run(
                ["pgrep", "-f", "worker.training ftjob-"], capture_output=True, text=True
            ).stdout.split()
            if not pids:
                fault += " (no child running)"
            for pid in pids[:1]:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        elif fault == "kill_api":
            self.api.kill(signal.SIGKILL)
            self.start_api()
        elif fault == "restart_redis":
            self.redis.kill(signal.SIGKILL)
            self.redis.start()
        elif fault == "drop_db_connections":
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                    "AND pid <> pg_backend_pid()",
                    (self.db_name,),
                )
        self.injected.append({"fault": fault, "at_s": round(started - self.t0, 1)})

    def run(self, n_jobs: int, n_faults: int, deadline_s: float) -> dict[str, Any]:
        self.t0 = time.monotonic()
        dataset_id = self.upload()
        job_ids: list[str] = []
        events = [("job", None)] * n_jobs + [("fault", f) for f in (self.rng.choice(FAULTS) for _ in range(n_faults))]
        self.rng.shuffle(events)
        events.insert(0, ("job", None))
        events = events[: n_jobs + n_faults]
        for kind, fault in events:
            if kind == "job":
                job_ids.append(self.submit(dataset_id))
            else:
                assert fault is not None
                self.inject(fault)
            time.sleep(self.rng.uniform(1.0, 4.0))
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and not all(s in TERMINAL for s in self.statuses(job_ids).values()):
            time.sleep(1)
        time.sleep(8)  # one sweep after the last ending (sweep_min_age 5 s, reconcile every 1 s)
        return self.audit(job_ids)

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        with psycopg.connect(self._pg_url()) as conn:
            rows = conn.execute("SELECT id, status FROM jobs WHERE id = ANY(%s)", (job_ids,)).fetchall()
        return dict(rows)

    def _pg_url(self) -> str:
        return self.pg_url

    def audit(self, job_ids: list[str]) -> dict[str, Any]:
        from core.storage import hash_dir

        store = Path(self.env["TUNESERVE_DATA_DIR"]) / "store"
        with psycopg.connect(self._pg_url()) as conn:
            jobs: dict[str, Any] = dict(
                conn.execute("SELECT id, status FROM jobs WHERE id = ANY(%s)", (job_ids,)).fetchall()
            )
            adapters = conn.execute("SELECT job_id, path, files FROM adapters").fetchall()
            successes: dict[str, int] = dict(
                conn.execute(
                    "SELECT job_id, count(*) FROM job_events WHERE message LIKE 'job succeeded%%' GROUP BY job_id"
                ).fetchall()
            )
            dataset_paths = {row[0] for row in conn.execute("SELECT path FROM datasets").fetchall()}
            errors = conn.execute("SELECT id, error_code, error_message FROM jobs WHERE status = 'failed'").fetchall()
        per_job: dict[str, int] = {}
        for job_id, _, _ in adapters:
            per_job[job_id] = per_job.get(job_id, 0) + 1
        adapter_paths = {path for _, path, _ in adapters}
        orphan_files = [p.name for p in (store / "tmp").iterdir()] if (store / "tmp").is_dir() else []
        orphan_files += [
            f"adapters/{p.name}" for p in (store / "adapters").iterdir() if f"adapters/{p.name}" not in adapter_paths
        ]
        orphan_files += [
            f"datasets/{p.name}" for p in (store / "datasets").iterdir() if f"datasets/{p.name}" not in dataset_paths
        ]
        if (store / "jobs").is_dir():
            orphan_files += [f"jobs/{p.name}" for p in (store / "jobs").iterdir() if jobs.get(p.name) in TERMINAL]
        orphan_rows = [
            path for _, path, files in adapters if not (store / path).is_dir() or hash_dir(store / path)[0] != files
        ]
        orphan_rows += [job_id for job_id, status in jobs.items() if status == "succeeded" and job_id not in per_job]
        counts = {
            "jobs_lost": sum(job_id not in jobs for job_id in job_ids),
            "jobs_stuck": sum(status not in TERMINAL for status in jobs.values()),
            "duplicate_adapters": sum(n > 1 for n in per_job.values()) + sum(n > 1 for n in successes.values()),
            "orphan_files": len(orphan_files),
            "orphan_rows": len(orphan_rows),
        }
        by_status: dict[str, int] = {}
        for status in jobs.values():
            by_status[status] = by_status.get(status, 0) + 1
        return {
            "counts": counts,
            "jobs": len(job_ids),
            "faults": len(self.injected),
            "by_status": by_status,
            "injected": self.injected,
            "failed": [list(e) for e in errors],
            "orphans": {"files": orphan_files, "rows": orphan_rows},
            "seconds": round(time.monotonic() - self.t0, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=600, help="seconds to wait for every job to end")
    parser.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="tuneserve-faults-") as tmp:
        bench = Bench(Path(tmp), args.seed)
        try:
            bench.start()
            result = bench.run(args.jobs, args.faults, args.deadline)
        finally:
            bench.stop()
            # The processes' logs outlive the run, for reading what a failed job went through.
            shutil.copytree(Path(tmp) / "logs", args.out.parent / "faults-logs", dirs_exist_ok=True)
    result["seed"] = args.seed
    print(
        f"{result['jobs']} jobs, {result['faults']} faults in {result['seconds']} s; jobs by status: {result['by_status']}"
    )
    print("faults injected: " + ", ".join(f"{f['fault']}@{f['at_s']}s" for f in result["injected"]))
    print(f"{'count':<20}{'value':>6}")
    for name, value in result["counts"].items():
        print(f"{name:<20}{value:>6}")
    if result["failed"]:
        print("failed jobs (attempts used up):", result["failed"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if any(result["counts"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
