"""What a process the server starts (a worker, a decoder) does so as not to outlive it."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> None:
    """Have the kernel send `sig` to this process when its parent dies, even by SIGKILL
    (Linux only; elsewhere a no-op)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, sig)
