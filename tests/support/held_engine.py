"""Run only by tests/test_process_cleanup.py, as a nested pytest (the name keeps it out of the suite's collection):
hold the serving engine and a Celery worker with its fork server, say so, and wait to be killed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support.stack import Stack


def test_hold_an_engine_and_a_worker(serving_stack: Stack) -> None:
    serving_stack.start_worker()
    log = serving_stack.worker_log
    assert log is not None
    deadline = time.monotonic() + 120
    while not (log.exists() and " ready." in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    Path(os.environ["TUNESERVE_TEST_HELD_READY"]).write_text("held")
    time.sleep(600)
