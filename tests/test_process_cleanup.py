"""Nothing a test run starts outlives it, however it ends: a pytest run (with an xdist lane, as `make test` runs)
that holds the vLLM engine and a Celery worker is killed with SIGKILL, lane and all, and every process it started
is gone. (Killing the controller alone is gentler: its lane sees the pipe close and tears down.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.paths import ROOT
from tests.support.processes import die_with_parent


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, command line) of every process."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[19]), command)
    return table


def _descendants(root: int) -> dict[tuple[int, int], str]:
    """(pid, start time) -> command line of every live descendant of `root`: start times tell a reused pid apart.
    By parentage, not by an environment marker: setproctitle (Celery, vLLM, the fork server) overwrites the memory
    that /proc/PID/environ reads."""
    table = _process_table()
    found: dict[tuple[int, int], str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started, command) in table.items():
            if ppid == parent:
                found[(pid, started)] = command
                frontier.append(pid)
    return found


def _still_running(processes: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    table = _process_table()
    return {key: command for key, command in processes.items() if key[0] in table and table[key[0]][1] == key[1]}


def test_a_sigkilled_test_run_leaves_no_process_behind(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    env = {**os.environ, "TUNESERVE_TEST_HELD_READY": str(ready)}
    held: dict[tuple[int, int], str] = {}
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "1",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "run"),
            "tests/support/held_engine.py",
        ],
        cwd=ROOT,
        env=env,
        stdout=(tmp_path / "run.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert run.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline, "the nested run never held its engine"
            time.sleep(0.5)
        held = _descendants(run.pid)
        # Its lane (pytest), serving and its engine core, the Celery worker and its fork server.
        commands = "\n".join(held.values())
        assert "pytest" in commands and "serving" in commands and "celery" in commands, commands
        assert "forkserver" in commands and len(held) >= 5, commands
        # The controller and its lane at once, as an OOM kill or a cancelled CI job's SIGKILL of everything pytest
        # does: no teardown runs anywhere, so only the kernel's death signals can take the rest.
        lanes = [pid for (pid, _), command in held.items() if "pytest-xdist running" in command]
        assert lanes, commands
        for pid in (run.pid, *lanes):
            os.kill(pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 30
        while (left := _still_running(held)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running after SIGKILL of pytest: {left}"
    finally:
        run.kill()
        for pid, _ in _still_running(held):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
