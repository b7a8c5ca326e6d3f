"""Child processes of the tests: their own process groups, gone when pytest goes (core/processes.py, which the
worker, the benchmarks and the demo use too)."""

from __future__ import annotations

from core.processes import die_with_parent, free_port, start_in_own_group, stop_process_group

__all__ = ["die_with_parent", "free_port", "start_in_own_group", "stop_process_group"]
