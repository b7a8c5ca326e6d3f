"""Warm job children: a per-worker process that has imported torch, transformers, peft and TRL once, and forks
one child per attempt.

A cold child (`python -m worker.training ...`) spends about ten seconds importing those libraries before its first
step; a child forked from this server starts with them loaded. The child keeps the cold child's contract: its own
session and process group (the supervisor stops it with `killpg`), SIGKILL when its parent dies (the server, which
itself dies with the worker: PR_SET_PDEATHSIG at both steps), the environment and working directory the supervisor
gives it, and an exit code reported to the supervisor as `Popen.returncode` would give it.

Nothing here touches CUDA or runs a tensor operation before a fork: torch's thread pools and CUDA context are made
lazily, so each child makes its own. The server is single-threaded (a select loop) for the same reason. DDP jobs
keep torchrun (their ranks are torchrun's children), so only plain commands come here.

Protocol over a socketpair, one JSON object per line:
    supervisor -> server  {"module": "worker.training", "argv": [...], "env": {...}, "cwd": "..."}
    server -> supervisor  {"ready": true}                 once, when the preloading is done
                          {"pid": N}                      the child is forked
                          {"pid": N, "returncode": R}     the child ended (negative R: killed by signal -R)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import setproctitle

from core.processes import die_with_parent

log = logging.getLogger("tuneserve.forkserver")

# The modules a child may run (each has main(), reading sys.argv as its `python -m` form does).
WARM_MODULES = ("worker.training", "worker.evaluation")
# What the server imports before its first fork: the libraries that cost the seconds, and the child modules.
PRELOAD = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "worker.training",
    "worker.evaluation",
    "worker.adapter_operations",
    "worker.objectives",
)
# Names inside the libraries that import lazily on first attribute access (transformers and TRL load submodules on
# demand): touched here so the child finds them loaded.
PRELOAD_ATTRIBUTES = {
    "transformers": ("AutoModelForCausalLM", "AutoTokenizer", "Trainer", "TrainingArguments", "TrainerCallback"),
    "peft": ("PeftModel", "LoraConfig", "get_peft_model", "prepare_model_for_kbit_training"),
    "trl": ("DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "GRPOConfig", "GRPOTrainer"),
}
START_TIMEOUT_SECONDS = 120.0


class ForkServerGone(RuntimeError):
    """The server exited or stopped answering; its children died with it (PR_SET_PDEATHSIG)."""


# ---------------------------------------------------------------------------------------------------------------
# The server process


def _preload() -> None:
    for name in PRELOAD:
        try:
            module = importlib.import_module(name)
        except Exception:  # an optional library missing only costs its child the import
            log.warning("forkserver: could not preload %s", name, exc_info=True)
            continue
        for attribute in PRELOAD_ATTRIBUTES.get(name, ()):
            with contextlib.suppress(Exception):
                getattr(module, attribute)
    with contextlib.suppress(Exception):
        importlib.import_module("trl.experimental.orpo")


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _run_child(sock: socket.socket, request: dict[str, Any]) -> None:
    """In the forked child: become the process `python -m MODULE ARGV...` would have been, then exit."""
    code = 1
    try:
        sock.close()
        os.setsid()
        die_with_parent()
        if os.getppid() == 1:  # the server died between fork and prctl
            os._exit(1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # What `ps` and `pgrep -f "worker.training JOB_ID"` show: the command a cold child would have had. (Before the
        # environment is replaced: setproctitle makes room for a long title by moving the original environment.)
        setproctitle.setproctitle(" ".join([sys.executable, "-m", request["module"], *request["argv"]]))
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        module = request["module"]
        sys.argv = [module, *request["argv"]]
        try:
            importlib.import_module(module).main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        logging.getLogger("tuneserve.forkserver").exception("forked child failed")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(fd: int) -> None:
    """The server's loop: fork on each request, report each child's end; exit when the supervisor goes away."""
    # The supervisor stops its children itself; a SIGTERM or Ctrl-C meant for the worker's group is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    started = time.monotonic()
    _preload()
    _send(sock, {"ready": True})
    # Into the worker's log (the server shares its stderr): from here an attempt starts warm, and at once.
    sys.stderr.write(f"forkserver {os.getpid()}: preloaded in {time.monotonic() - started:.1f} s\n")
    sys.stderr.flush()
    children: set[int] = set()
    buffer = b""
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return  # the supervisor is gone; our children get SIGKILL with us
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run_child(sock, request)
                children.add(pid)
                _send(sock, {"pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                _send(sock, {"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    serve(int(sys.argv[1]))


# ---------------------------------------------------------------------------------------------------------------
# The supervisor's side


class ForkServer:
    """One server per worker process, started with the worker and restarted if it dies."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ready = False
        self._ended: dict[int, int] = {}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the server (it preloads in the background); returns at once."""
        if self._process is not None and self._process.poll() is None:
            return
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "worker.forkserver", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        theirs.close()
        self._sock, self._buffer, self._ready, self._ended = ours, b"", False, {}

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process, self._sock = None, None

    def wait_ready(self) -> bool:
        """Start the server if needed and wait for its preloading; False if it failed (cold children then).

        The supervisor calls this before it claims a lease: nothing renews a lease while this waits.
        """
        self.start()
        if not self._ready:
            try:
                self._read_until(lambda m: bool(m.get("ready")), START_TIMEOUT_SECONDS)
            except (OSError, TimeoutError, ForkServerGone):
                log.warning("the fork server did not become ready", exc_info=True)
                self.stop()
                return False
            self._ready = True
        return True

    def spawn(self, module: str, argv: list[str], *, env: dict[str, str], cwd: str) -> WarmChild:
        """Fork a child that runs `module.main()` with sys.argv = [module, *argv] (the server must be ready)."""
        if not self._ready or self._sock is None:
            raise ForkServerGone("the fork server is not running")
        try:
            self._sock.sendall(json.dumps({"module": module, "argv": argv, "env": env, "cwd": cwd}).encode() + b"\n")
            reply = self._read_until(lambda m: "pid" in m and "returncode" not in m, START_TIMEOUT_SECONDS)
        except (OSError, ForkServerGone):
            self.stop()  # the next attempt starts a new server
            raise
        return WarmChild(self, int(reply["pid"]), [module, *argv])

    def _read_until(self, wanted: Any, timeout: float | None) -> dict[str, Any]:
        """Read messages until one satisfies `wanted` (returned); child ends seen on the way are recorded."""
        assert self._sock is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if "returncode" in message:
                    self._ended[int(message["pid"])] = int(message["returncode"])
                if wanted(message):
                    return message
            # A zero timeout still reads what has arrived (poll()).
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._sock], [], [], left)
            if not readable:
                raise TimeoutError
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ForkServerGone("the fork server exited")
            self._buffer += chunk

    def wait_child(self, pid: int, timeout: float | None) -> int:
        if pid in self._ended:
            return self._ended.pop(pid)
        try:
            self._read_until(lambda m: m.get("pid") == pid and "returncode" in m, timeout)
        except ForkServerGone:
            self.stop()
            return -signal.SIGKILL  # PR_SET_PDEATHSIG took the child with the server
        return self._ended.pop(pid)


class WarmChild:
    """A forked child as the supervisor sees it: the parts of `subprocess.Popen` that run_leased uses."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self.server = server
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self.server.wait_child(self.pid, timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
        return self.returncode

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.wait(timeout=0)
        return None


_server: ForkServer | None = None


def server() -> ForkServer:
    """This worker process's server (started on first use; `start_with_worker` starts it at worker boot)."""
    global _server
    if _server is None:
        _server = ForkServer()
    return _server


if __name__ == "__main__":
    main()
