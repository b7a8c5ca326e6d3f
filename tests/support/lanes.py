"""Lanes for the parallel suite (`pytest -n 2 --dist loadgroup`, the README's test command).

xdist's loadgroup sends every test of one `xdist_group` to one worker, in collection order. The groups follow what
is expensive to start and must not be started twice:

    engine      every test of the vLLM engine (the `serving` tier) and the browser: one engine, one Chromium
    postgres    every test on the session Postgres stack      } each session stack is started once, on one lane,
    sqlite      every test on the session embedded stack      } with pytest's own ordering inside the group
    <module>    the rest, a module at a time, so module fixtures are set up once

Without xdist the groups change nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

import pytest
from _pytest.nodeid import NodeId


def lane_of(item: pytest.Item) -> str:
    if item.get_closest_marker("serving") is not None or "tests/ui/" in item.nodeid:
        return "engine"
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("stack") in ("postgres", "sqlite"):
        return str(callspec.params["stack"])
    return item.nodeid.split("::", 1)[0]


def assign_lane(item: pytest.Item) -> None:
    """Mark the item's group and put it in its node id, `ID@GROUP`, which is what loadgroup schedules by.

    xdist 3.8 appends the group by setting `item._nodeid`, which pytest 9 no longer reads (a node id is now the
    structured `item._id`), so it is done here. The same line gives schemathesis's items, which all share one node
    id (the operation is only in their name), ids of their own: xdist keys its work by node id and would otherwise
    run one operation of the fifty.
    """
    lane = lane_of(item)
    item.add_marker(pytest.mark.xdist_group(lane))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        module, _, name = item.nodeid.rpartition("::")
        item._id = NodeId.parse(f"{module}::{item.name}@{lane}")


def one_thread_per_lane() -> None:
    """Two lanes on two cores: one math thread per lane (and the processes it starts, which inherit the environment),
    or both lanes' torch/OpenMP pools spin against each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")


def interrupt_on_sigterm() -> None:
    """A `timeout` or a cancelled CI job sends SIGTERM: make it an interruption with teardown (pytest's own path for
    Ctrl-C), so every fixture stops what it started. In an xdist lane the kernel also sends it SIGTERM when the
    controlling pytest dies, even by SIGKILL; what a lane starts dies with the lane (tests/support/processes.py).
    A teardown that hangs is cut short after two minutes."""

    def interrupt(signum: int, frame: object) -> None:
        # Not signal.alarm: SIGALRM is pytest-timeout's.
        deadline = threading.Timer(120, os._exit, (1,))
        deadline.daemon = True  # an exit that comes sooner does not wait for it
        deadline.start()
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread
    signal.signal(signal.SIGTERM, interrupt)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the controller died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
