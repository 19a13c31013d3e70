"""Child-process hygiene shared by every stage that runs work in subprocesses."""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent dies, so no orphan outlives a kill -9.

    Without it, a worker whose engine was killed keeps writing into a temp folder that the next
    run is about to clean, and holds memory nobody accounts for.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
