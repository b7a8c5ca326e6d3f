"""The fork server (worker/forkserver.py) keeps a cold child's contract: its own session, the environment and
working directory it is given, the exit code or signal as Popen reports them, the cold command line as its title,
and death with its parent. One real server (it preloads torch, transformers, peft and TRL) for the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.jobs import wait_until
from tests.support.markers import requires
from worker.forkserver import ForkServer

CHILD = "tests.support.forked_child"


@pytest.fixture(scope="module")
@requires("slow")
def server() -> Iterator[ForkServer]:
    server = ForkServer()
    assert server.wait_ready()
    try:
        yield server
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_exit_codes_and_signals_come_back_as_popen_gives_them(server: ForkServer) -> None:
    for code in (0, 3, 75):
        assert server.spawn(CHILD, ["exit", str(code)], env=dict(os.environ), cwd=os.getcwd()).wait(30) == code
    child = server.spawn(CHILD, ["sleep", "60"], env=dict(os.environ), cwd=os.getcwd())
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)  # the supervisor's hard stop: the child leads its own group
    assert child.wait(30) == -signal.SIGKILL


def test_a_child_gets_the_environment_and_directory_it_is_given_and_its_own_session(
    server: ForkServer, tmp_path: Path
) -> None:
    out = tmp_path / "env.json"
    env = dict(os.environ, TUNESERVE_FORKSERVER_PROBE="given")
    child = server.spawn(CHILD, ["env", "TUNESERVE_FORKSERVER_PROBE", str(out)], env=env, cwd=str(tmp_path))
    assert child.wait(30) == 0
    seen = json.loads(out.read_text())
    assert seen == {"value": "given", "cwd": str(tmp_path), "sid": child.pid}


def test_a_child_shows_the_cold_command_line(server: ForkServer) -> None:
    child = server.spawn(CHILD, ["sleep", "60"], env=dict(os.environ), cwd=os.getcwd())
    try:
        wait_until(
            lambda: (
                f"-m {CHILD} sleep 60" in Path(f"/proc/{child.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            ),
            timeout=10,
            what="the child's title",
        )
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)


def test_children_die_with_the_server_and_a_new_server_starts_after() -> None:
    server = ForkServer()
    assert server.wait_ready()
    child = server.spawn(CHILD, ["sleep", "60"], env=dict(os.environ), cwd=os.getcwd())
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)  # as when the worker above it dies: PR_SET_PDEATHSIG at each step
    wait_until(lambda: not _alive(child.pid), timeout=10, what="the child to die with its server")
    assert child.wait(30) == -signal.SIGKILL
    started = time.monotonic()
    assert server.wait_ready()  # the supervisor's next attempt starts a fresh server
    assert server.spawn(CHILD, ["exit", "0"], env=dict(os.environ), cwd=os.getcwd()).wait(30) == 0
    print(f"fork server restart and preload: {time.monotonic() - started:.1f} s")
    server.stop()
