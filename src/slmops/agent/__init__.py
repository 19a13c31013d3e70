"""The edge agent: fetch one variant, verify it, install it into an A/B slot, health-check it,
switch atomically and keep the previous model for instant rollback.

Boundary (DESIGN.md, enforced by tests/agent): this package imports only slmops.core,
slmops.protocol, slmops.bundle (verification and the registry client) and slmops.runtimes, and
never torch, transformers or slmops.server. This module stays tiny because the health-check
child process (`python -m slmops.agent.health`) imports it first.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "SLMOPS_AGENT_CRASH_AT"
"""Test seam: when this variable names a phase, the agent kills itself with SIGKILL there.

Phases: ``download-mid`` (a blob half-written to its ``.part``), ``verify`` (before checks),
``install`` (slot half-materialised), ``health`` (slot complete, not yet checked), ``switch``
(just before the state file is replaced) and ``switched`` (just after). Real kill -9 semantics:
no finally blocks, no atexit, so tests see exactly what a power cut would leave.
"""


def crash_point(phase: str) -> None:
    """Die by SIGKILL at `phase` when SLMOPS_AGENT_CRASH_AT asks for it (tests only)."""
    if os.environ.get(CRASH_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)
