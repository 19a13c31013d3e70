"""What service functions need from the application besides a session.

``Services`` is created once per app by ``create_app`` (``app.state.services``; routes take it
as ``ServicesDep`` from ``api/deps.py``, the ticker gets it handed over): the one blob store,
the cache of resolved versions, the spacing of the ticker's slow telemetry work, and the
combiner that steps device reports in groups per rollout (``server/combine.py``). Keeping
these on the app rather than in module globals means two apps in one process (tests) share
nothing, and a newcomer finds every piece of process state in one place.

``Context`` is what one use case carries out its commands with (rollout steps, desired-state
refreshes): built from the services by ``Services.context()``, or by hand in tests and scripts
that have no app (then without a target cache).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from slmops.server.combine import Combiner
from slmops.server.registry.store import BlobStore
from slmops.server.settings import ServerSettings
from slmops.server.targets import TargetCache


@dataclass
class Context:
    """What carrying out commands needs besides the session."""

    store: BlobStore
    poll_seconds: float
    now: float = field(default_factory=time.time)
    targets: TargetCache | None = None
    reports: Combiner[Any] | None = None  # device reports stepped in groups per rollout


class Every:
    """Spaces out work to at most once per ``seconds`` in this process (thread-safe).

    Only spaces work out: whatever it guards must be harmless to run twice (another process
    may run it at the same time)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = 0.0
        self._lock = threading.Lock()

    def due(self, now: float) -> bool:
        """True (and the clock restarts) when ``seconds`` passed since the last time it was."""
        with self._lock:
            if now - self.last < self.seconds:
                return False
            self.last = now
            return True


@dataclass
class Services:
    """The app-scoped objects every use case shares (see the module docstring)."""

    settings: ServerSettings
    store: BlobStore
    targets: TargetCache = field(default_factory=TargetCache)
    slow: Every = field(default_factory=lambda: Every(600.0))
    reports: Combiner[Any] = field(default_factory=Combiner)

    @classmethod
    def create(cls, settings: ServerSettings) -> Services:
        return cls(settings, BlobStore(settings.data_dir), slow=Every(settings.drift_check_seconds))

    @property
    def poll_seconds(self) -> float:
        return self.settings.poll_seconds

    def context(self, now: float | None = None) -> Context:
        """A Context for one use case, stamped ``now`` (default: the current time)."""
        return Context(
            self.store,
            self.poll_seconds,
            time.time() if now is None else now,
            self.targets,
            self.reports,
        )
