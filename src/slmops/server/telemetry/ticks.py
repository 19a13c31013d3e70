"""The telemetry work of the rollout ticker, in one call for ``server/rollouts.tick_all``.

Every tick: ``feed_metrics`` (fresh cohort figures for running rollouts with metric gates).
At most every ``SLOW_EVERY_S`` per process: ``check_drift`` and ``prune`` (retention). The
last-run time is per process and only spaces out work: alerts are deduplicated in the database
(an open alert is not raised twice), and pruning twice is harmless. Errors are logged, never
raised, so telemetry can never stop rollouts from ticking.
"""

from __future__ import annotations

import logging
import threading
import time

from slmops.server.db.session import Database
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts import Context
from slmops.server.telemetry.cohorts import feed_metrics
from slmops.server.telemetry.drift import check_drift
from slmops.server.telemetry.store import flush_counters, prune

log = logging.getLogger("slmops.server.telemetry")
SLOW_EVERY_S = 600.0
_last_slow = {"at": 0.0}
_lock = threading.Lock()


def telemetry_tick(
    db: Database, store: BlobStore, *, poll_seconds: float, slow_every: float = SLOW_EVERY_S
) -> None:
    now = time.time()
    with db.sessions() as session:
        try:
            flush_counters(session)
        except Exception:
            log.exception("flushing telemetry counters failed")
        try:
            feed_metrics(session, Context(store, poll_seconds, now=now))
        except Exception:
            session.rollback()
            log.exception("feeding telemetry to rollouts failed")
        with _lock:
            due = now - _last_slow["at"] >= slow_every
            if due:
                _last_slow["at"] = now
        if not due:
            return
        try:
            check_drift(session, store, now=now)
            prune(session, now=now)
        except Exception:
            session.rollback()
            log.exception("telemetry drift check or retention failed")
