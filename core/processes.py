"""The processes tuneserve starts (a worker's children, its fork server) and the ones its tests, benchmarks and
demo start (workers, serving, the API, private Redis): each in a session of its own, so its whole group can be
signalled, and each gone with its parent, however the parent ends.

The kernel's death signal (PR_SET_PDEATHSIG) is what holds this together when a parent is killed outright: no
teardown runs then, and a child in its own session gets no signal from the terminal or from its parent's group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1

# A worker runs one task at a time in the solo pool: the task supervises its job's child (which has the GPU and the
# worker's fork server to itself), and gossip and mingle are cluster chatter that leases make unnecessary.
# docker-compose.yml runs the same arguments (tests/test_compose.py checks).
WORKER_ARGUMENTS = (
    "-A",
    "worker.app",
    "worker",
    "--pool=solo",
    "--concurrency=1",
    "--without-gossip",
    "--without-mingle",
)


def worker_command(queue: str, *, name: str | None = None) -> list[str]:
    """A Celery worker on `queue` (named `name@host` when several share a machine)."""
    return [sys.executable, "-m", "celery", *WORKER_ARGUMENTS, "-Q", queue, "--loglevel=INFO"] + (
        ["-n", f"{name}@%h"] if name else []
    )


def serving_command() -> list[str]:
    """`python -m serving`: vLLM's OpenAI server with tuneserve's adapter resolver and guard (serving/)."""
    return [sys.executable, "-m", "serving"]


def api_command(port: int, *, host: str = "127.0.0.1", log_level: str = "info") -> list[str]:
    """The API under uvicorn, built by its factory from the environment's settings (`tuneserve-api` in compose)."""
    return [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", host, "--port", str(port),
            "--log-level", log_level]  # fmt: skip


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when the thread that started it exits (preexec_fn, or a child's
    first line). SIGKILL by default: a Celery worker answers SIGTERM with a warm shutdown that waits for its job,
    and a serving process may not finish a graceful one; their own children follow through their own death signal."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def start_in_own_group(argv: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start `argv` leading a new session and process group, dying with this process, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def stop_process_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Send `sig` to the process's group (its children too: vLLM's engine core, a worker's fork server), SIGKILL
    the group after `grace` seconds, and return once the leader is reaped and no process of the group is left."""
    for signal_now, wait in ((sig, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, signal_now)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # The leader is reaped; members of its group that outlived it (a child that ignored the signal) may not be.
    deadline = time.monotonic() + 10
    while (members := live_group_members(process.pid)) and time.monotonic() < deadline:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def live_group_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that still run (a zombie waiting for init to reap it does not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]  # after "pid (comm) "; comm may hold spaces
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
