"""`make compose-test`: the compose deployment built and run for real on this machine, with podman.

Installs what is missing (podman, runc, debootstrap from apt; podman-compose from pip into var/compose-tools),
bootstraps a Debian base image once (kept between runs: it is the slow, unchanging part), builds the CPU image and
the local Postgres and Redis images (podman's layer cache makes a rebuild seconds), brings the stack up with
podman-compose from docker-compose.yml + docker-compose.cpu.yml on the host network, waits for the health checks,
then through the public API: a tenant and key, a dataset, POST /jobs, the worker container restarted mid-job and
the job resumed from its checkpoint, success, the before/after evaluation, /generate?adapter= and
/v1/chat/completions with the adapter; then `down` with volumes. Each step prints its time; the first failure
prints the failing container's log tail and exits non-zero. The stack is taken down on success, failure, Ctrl-C
or SIGTERM. See docs/deployment.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from core.demo_data import write_demo_dataset
from core.statuses import TERMINAL_STATUSES

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "compose"
TOOLS = ROOT / "var" / "compose-tools"
CONTAINERS_CONF = ROOT / "docker" / "local" / "containers.conf"
PROJECT = "tuneserve"
BASE_IMAGE = "localhost/tuneserve-debian-base:bookworm"
CPU_IMAGE = "localhost/tuneserve-cpu:local"
DEBIAN_MIRROR = os.environ.get("TUNESERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
WHEELS = Path(os.environ.get("TUNESERVE_WHEEL_DIR", "/opt/wheels"))  # where the CPU torch wheel lies here
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# Ports of the containers' own services, clear of the host's Postgres (5432), Redis (6379), api (8000), serving.
PORTS = {"postgres": 15432, "redis": 16379, "api": 18000, "serving": 18100}
API = f"http://127.0.0.1:{PORTS['api']}"
HYPERPARAMETERS = {
    "max_steps": 240,
    "learning_rate": 3e-3,
    "batch_size": 16,
    "lora_r": 8,
    "lora_alpha": 16,
    "checkpoint_every_steps": 40,
    "keep_checkpoints": 2,
}
RESTART_AT_STEP = 50  # after the first checkpoint (40), well before the end


class StepFailed(Exception):
    def __init__(self, message: str, container: str | None = None) -> None:
        super().__init__(message)
        self.container = container
        self.tail = ""


def log(message: str) -> None:
    print(message, flush=True)


def run(args: list[str], *, check: bool = True, quiet: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, text=True, capture_output=quiet, env=ENV, **kw)
    if check and result.returncode != 0:
        tail = ((result.stdout or "") + (result.stderr or ""))[-3000:] if quiet else ""
        raise StepFailed(f"`{' '.join(args[:6])} ...` exited {result.returncode}\n{tail}")
    return result


ENV = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF), HF_HUB_OFFLINE="1")
TIMES: list[tuple[str, float]] = []


@contextmanager
def step(name: str, container: str | None = None) -> Iterator[None]:
    log(f"== {name}")
    started = time.monotonic()
    try:
        yield
    except StepFailed as e:
        e.container = e.container or container
        raise
    except Exception as e:  # an HTTP error, a timeout: the step's container is the one to look at
        raise StepFailed(f"{type(e).__name__}: {e}", container) from e
    took = time.monotonic() - started
    TIMES.append((name, took))
    log(f"   ok in {took:.1f}s")


def container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(
        [
            str(TOOLS / "bin" / "podman-compose"),
            "--project-name",
            PROJECT,
            "--env-file",
            str(WORK / ".env"),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "-f",
            str(ROOT / "docker-compose.cpu.yml"),
            *args,
        ],
        check=check,
        quiet=True,
        cwd=ROOT,
    )


def install_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        log(f"   apt-get install {' '.join(missing)}")
        run(["apt-get", "update", "-qq"], quiet=True)
        run(["apt-get", "install", "-y", "-qq", *missing], quiet=True, env={**ENV, "DEBIAN_FRONTEND": "noninteractive"})
    if not (TOOLS / "bin" / "podman-compose").exists():
        log("   pip install podman-compose (into var/compose-tools)")
        run([sys.executable, "-m", "venv", str(TOOLS)], quiet=True)
        run([str(TOOLS / "bin" / "pip"), "install", "--quiet", "podman-compose==1.6.0"], quiet=True)


def base_image() -> None:
    if run(["podman", "image", "exists", BASE_IMAGE], check=False, quiet=True).returncode == 0:
        log(f"   {BASE_IMAGE} is there (kept between runs)")
        return
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        quiet=True,
    )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, quiet=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def build_images() -> None:
    common = ["podman", "build", "--network=host", "--ignorefile", "docker/Dockerfile.cpu.dockerignore"]
    # Build-time only: the host's CA bundle (pip behind this workplace's TLS proxy), the local wheel directory
    # (the CPU torch) and a pip.conf naming both. Mounted, never copied: the image keeps none of them.
    mounts = [
        "-v",
        f"{HOST_CA}:/run/host-ca.crt:ro",
        "-v",
        f"{WHEELS}:/wheels:ro",
        "-v",
        f"{ROOT / 'docker' / 'local' / 'pip.conf'}:/run/pip.conf:ro",
    ]
    args = [
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg",
        "EXTRAS=cpu",
        "--build-arg",
        "PIP_CONFIG_FILE=/run/pip.conf",
        "--build-arg",
        "TORCH_PIP_OPTIONS=--find-links /wheels",
    ]
    for name, dockerfile, extra in (
        ("tuneserve-postgres", "docker/local/Dockerfile.postgres", []),
        ("tuneserve-redis", "docker/local/Dockerfile.redis", []),
        ("tuneserve-cpu", "docker/Dockerfile.cpu", mounts + args),
    ):
        started = time.monotonic()
        run([*common, "-f", dockerfile, "-t", f"localhost/{name}:local", *extra, "."], quiet=True, cwd=ROOT)
        log(f"   {name}: {time.monotonic() - started:.1f}s")


def write_env() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    password = secrets.token_hex(12)
    p = PORTS
    env = {
        "POSTGRES_USER": "tuneserve",
        "POSTGRES_PASSWORD": password,
        "POSTGRES_DB": "tuneserve",
        "POSTGRES_PORT": p["postgres"],
        "REDIS_PORT": p["redis"],
        "TUNESERVE_BASE_IMAGE": BASE_IMAGE,
        "TUNESERVE_DATA_DIR": "/data",
        "TUNESERVE_STORE_ROOT": "/data/store",
        "TUNESERVE_DATABASE_URL": f"postgresql+psycopg://tuneserve:{password}@127.0.0.1:{p['postgres']}/tuneserve",
        "TUNESERVE_BROKER_URL": f"redis://127.0.0.1:{p['redis']}/0",
        "TUNESERVE_SERVING_TOKEN": secrets.token_hex(16),
        "TUNESERVE_BASE_MODEL": "/hf-cache/models/tiny",
        "TUNESERVE_SERVED_MODEL_NAME": "tiny",
        "TUNESERVE_API_PORT": p["api"],
        "TUNESERVE_SERVING_PORT": p["serving"],
        "TUNESERVE_SERVING_URLS": f"http://127.0.0.1:{p['serving']}",
        "TUNESERVE_AUTH_ENABLED": "true",
        "TUNESERVE_TRAINING_DEVICE": "cpu",
        "TUNESERVE_SERVING_MAX_MODEL_LEN": 512,
        "TUNESERVE_SERVING_MAX_TOKENS": 64,
        "TUNESERVE_SERVING_GPU_MEMORY_UTILIZATION": 0.2,
        # A restarted worker's job is claimable again within seconds (the tests' FAST_RECOVERY).
        "TUNESERVE_LEASE_SECONDS": 6,
        "TUNESERVE_HEARTBEAT_SECONDS": 1,
        "TUNESERVE_RECONCILE_INTERVAL_SECONDS": 1,
        "TUNESERVE_REQUEUE_AFTER_SECONDS": 3,
    }
    (WORK / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (WORK / ".env").chmod(0o600)


def status(name: str) -> dict[str, Any]:
    out = run(["podman", "inspect", name], check=False, quiet=True)
    if out.returncode != 0:
        return {}
    return dict(json.loads(out.stdout)[0]["State"])


def wait_healthy(service: str, timeout: float) -> None:
    """podman < 4.6 runs health checks from systemd timers (none here) and podman-compose then ignores
    `condition: service_healthy`: run the compose file's own check until it passes."""
    name = container(service)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(name)
        if state and not state.get("Running"):
            raise StepFailed(f"{service} exited {state.get('ExitCode')}", name)
        if run(["podman", "healthcheck", "run", name], check=False, quiet=True).returncode == 0:
            return
        time.sleep(2)
    raise StepFailed(f"{service} not healthy within {timeout:.0f}s", name)


def wait_exited_ok(service: str, timeout: float) -> None:
    name = container(service)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(name)
        if state and not state.get("Running") and state.get("Status") == "exited":
            if state.get("ExitCode") != 0:
                raise StepFailed(f"{service} exited {state.get('ExitCode')}", name)
            return
        time.sleep(1)
    raise StepFailed(f"{service} did not finish within {timeout:.0f}s", name)


def wait_for(what: str, check: Callable[[], Any], timeout: float, service: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(container(service))
        if not state.get("Running"):
            raise StepFailed(f"{service} is not running while waiting for {what}", container(service))
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise StepFailed(f"{what}: not within {timeout:.0f}s", container(service))


def log_tail(name: str, lines: int = 60) -> str:
    out = run(["podman", "logs", "--tail", str(lines), name], check=False, quiet=True)
    return (out.stdout or "") + (out.stderr or "")


def leftovers() -> list[str]:
    found = []
    for kind in ("ps", "volume"):
        args = [
            "podman",
            kind,
            "ls" if kind == "volume" else "-a",
            "-q",
            "--filter",
            f"label=io.podman.compose.project={PROJECT}",
        ]
        out = run(args, check=False, quiet=True).stdout or ""
        found += [f"{kind}:{line}" for line in out.split() if line]
    return found


def down() -> None:
    compose("down", "--volumes", "--timeout", "10", check=False)


def api_story(key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=API, headers=headers, timeout=120) as client:
        with step("upload a dataset", "tuneserve_api_1"):
            train, test = write_demo_dataset(WORK / "task", n_train=512, n_test=64, seed=0)
            with train.open("rb") as f, test.open("rb") as t:
                r = client.post("/datasets", files={"file": ("train.jsonl", f), "test_file": ("test.jsonl", t)})
            r.raise_for_status()
            dataset = r.json()
            log(f"   dataset {dataset['id']}: {dataset['format']}, splits {dataset['splits']}")

        with step("POST /jobs", "tuneserve_api_1"):
            r = client.post(
                "/jobs", json={"dataset_id": dataset["id"], "suffix": "compose", "hyperparameters": HYPERPARAMETERS}
            )
            r.raise_for_status()
            job_id = r.json()["id"]
            log(f"   job {job_id}: {HYPERPARAMETERS['max_steps']} steps, checkpoint every 40")

        def job() -> dict[str, Any]:
            return dict(client.get(f"/jobs/{job_id}").json())

        with step(f"job reaches step {RESTART_AT_STEP} (past its first checkpoint)", "tuneserve_worker_1"):
            j = wait_for(
                "training progress",
                lambda: (
                    lambda j: (
                        j
                        if j["status"] in ("failed", "cancelled") or j["progress"]["step"] >= RESTART_AT_STEP
                        else None
                    )
                )(job()),
                600,
                "worker",
            )
            if j["status"] != "running":
                raise StepFailed(f"job is {j['status']}: {j.get('error')}", "tuneserve_worker_1")
            log(f"   step {j['progress']['step']}/{j['progress']['total_steps']}, status {j['status']}")

        with step("restart the worker container mid-job", "tuneserve_worker_1"):
            run(["podman", "restart", "--time", "5", container("worker")], quiet=True)

        with step("job resumes from its checkpoint and succeeds", "tuneserve_worker_1"):
            j = wait_for(
                "the job to finish",
                lambda: (lambda j: j if j["status"] in TERMINAL_STATUSES else None)(job()),
                900,
                "worker",
            )
            if j["status"] != "succeeded":
                raise StepFailed(f"job ended {j['status']}: {j.get('error')}", "tuneserve_worker_1")
            events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
            resumed = [e for e in events if e["message"].startswith("resuming from checkpoint")]
            if not resumed or j["attempts"] < 2:
                raise StepFailed(
                    f"no resume: attempts {j['attempts']}, events {[e['message'] for e in events][-20:]}",
                    "tuneserve_worker_1",
                )
            log(f"   attempts {j['attempts']}; {resumed[0]['message']} (attempt {resumed[0]['attempt']})")
            adapter = str(j["fine_tuned_model"])

        with step("evaluation before/after", "tuneserve_worker_1"):
            report = wait_for(
                "evaluation",
                lambda: (lambda r: r if r["evaluation"]["status"] in ("succeeded", "failed", "none") else None)(
                    client.get(f"/jobs/{job_id}/report").json()
                ),
                900,
                "worker",
            )
            if report["evaluation"]["status"] != "succeeded":
                raise StepFailed(f"evaluation {report['evaluation']['status']}", "tuneserve_worker_1")
            for m in report["metrics"]:
                log(f"   {m['name']:<14} base {m['base']:.3f}  adapter {m['adapter']:.3f}  delta {m['delta']:+.3f}")

        with step("POST /generate?adapter=", "tuneserve_serving_1"):
            row = json.loads(test.read_text().splitlines()[0])
            r = client.post(
                "/generate",
                params={"adapter": adapter},
                json={"messages": row["messages"][:-1], "max_tokens": 8, "temperature": 0},
            )
            r.raise_for_status()
            log(f"   expected {row['messages'][-1]['content']!r}, adapter says {r.json()['text'].strip()!r}")

        with step("POST /v1/chat/completions with the adapter", "tuneserve_serving_1"):
            r = client.post(
                "/v1/chat/completions",
                json={"model": adapter, "messages": row["messages"][:-1], "max_tokens": 8, "temperature": 0},
            )
            r.raise_for_status()
            log(f"   {r.json()['choices'][0]['message']['content'].strip()!r}")


def main() -> int:
    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    try:
        with step("tools (podman, runc, debootstrap, podman-compose)"):
            install_tools()
        with step("base image"):
            base_image()
        write_env()
        with step("leftovers of an earlier run: down with volumes"):
            down()
        with step("build images (layer cache between runs)"):
            build_images()
        try:
            stack()
        except StepFailed as e:
            # Read the failing container's log before `down` removes it.
            e.tail = log_tail(e.container) if e.container else ""
            down()
            raise
        with step("down with volumes; nothing left behind"):
            down()
            left = leftovers()
            if left:
                raise StepFailed(f"left behind: {left}")
    except StepFailed as e:
        log(f"\nFAILED: {e}")
        if e.container:
            log(f"--- last lines of {e.container}'s log ---\n{e.tail or log_tail(e.container)}")
        return 1
    except BaseException as e:  # noqa: BLE001 (Ctrl-C, SIGTERM, a bug here: the stack still goes down)
        log(f"\n{type(e).__name__}: {e}; taking the stack down")
        down()
        return 130
    log("\n== times")
    for name, took in TIMES:
        log(f"   {took:7.1f}s  {name}")
    log(f"   {time.monotonic() - started:7.1f}s  total")
    return 0


def stack() -> None:
    with step("up: postgres, redis (health checks)", "tuneserve_postgres_1"):
        compose("up", "-d", "--no-build", "postgres", "redis")
        wait_healthy("postgres", 120)
        wait_healthy("redis", 60)
    with step("up: migrate and fetch-model one-shots", "tuneserve_migrate_1"):
        compose("up", "-d", "--no-build", "--no-deps", "migrate", "fetch-model")
        wait_exited_ok("migrate", 180)
        wait_exited_ok("fetch-model", 180)
    with step("up: api, worker, serving (health checks)", "tuneserve_api_1"):
        compose("up", "-d", "--no-build", "--no-deps", "api", "worker", "serving")
        wait_healthy("api", 180)
        wait_healthy("serving", 600)
    with step("create a tenant and key (tuneserve admin in the api container)", "tuneserve_api_1"):
        run(["podman", "exec", container("api"), "tuneserve", "admin", "create-tenant", "compose"], quiet=True)
        key = run(["podman", "exec", container("api"), "tuneserve", "admin", "create-key", "compose"], quiet=True)
        secret = key.stdout.strip().splitlines()[-1]
    api_story(secret)


if __name__ == "__main__":
    sys.exit(main())
