"""Child processes of the tests: their own process groups, gone when pytest goes."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess


def die_with_parent() -> None:
    """Runs in a test's child process: the kernel sends it SIGKILL if pytest dies without its teardown.

    SIGKILL, not SIGTERM: a Celery worker answers SIGTERM with a warm shutdown that waits for its running job, and a
    serving process may not finish its graceful shutdown; their own children follow through their PR_SET_PDEATHSIG
    (worker/forkserver.py, serving/lifecycle.py)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Small enough for 2 CPU cores: max_cpu_loras below the number of adapters the tests make, so the LRU churns.


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process and its children (vLLM's engine core), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
