"""vLLM's own processes die with the serving process that started them.

`python -m serving` runs vLLM's API server in-process; vLLM starts its engine core (and, on some backends, a
`VLLM::Worker`) as multiprocessing children. When the serving process is killed outright (SIGKILL, or the
PR_SET_PDEATHSIG of whoever started it), those children used to stay behind under init, holding memory and a port.
vLLM loads its general plugins in each of its processes, so this plugin sets PR_SET_PDEATHSIG in every one that is
a multiprocessing child: the kernel then kills it when its parent goes, however the parent ends.
"""

from __future__ import annotations

import multiprocessing
import os

from core.processes import die_with_parent


def register() -> None:
    if multiprocessing.parent_process() is None:
        return  # the serving process itself: whoever started it decides (tests, the demo and compose do)
    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None and os.getppid() != parent.pid:
        os._exit(1)  # the parent died before the prctl took effect
