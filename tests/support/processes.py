"""Child processes of the tests: their own process groups, gone when pytest goes (core/processes.py, which the
worker, the benchmarks and the demo use too)."""

from __future__ import annotations

from core.processes import (
    api_command,
    die_with_parent,
    free_port,
    serving_command,
    start_in_own_group,
    stop_process_group,
    worker_command,
)

__all__ = [
    "api_command",
    "die_with_parent",
    "free_port",
    "serving_command",
    "start_in_own_group",
    "stop_process_group",
    "worker_command",
]
