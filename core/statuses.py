"""The statuses every record of work shares (jobs, evaluations, adapter operations), and which of them end it.

Defined once, here, without imports, so the API, the CLI, the console (through the page), the worker, the tests
and the benchmarks all read the same set.
"""

from __future__ import annotations

# A record in one of these is done for good: no worker holds it, nothing will change its status again.
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
