"""Child processes of a worker must not outlive it."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to the child when the worker that started it dies.

    A worker killed with SIGKILL cannot stop its training child; without this the orphan would keep
    training until its lease check noticed another attempt had taken over.
    """
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
