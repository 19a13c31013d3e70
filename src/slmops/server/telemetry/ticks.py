"""The telemetry work of the ticker (``server/ticker.py``), in one call.

Every tick: ``flush_counters`` and ``feed_metrics`` (fresh cohort figures for running rollouts
with metric gates). When the app's ``slow`` clock says so (``drift_check_seconds``, kept on the
app's ``Services``): ``check_drift`` and ``prune`` (retention). The clock only spaces out work:
alerts are deduplicated in the database (an open alert is not raised twice), and pruning twice
is harmless. Errors are logged, never raised, so telemetry can never stop rollouts from ticking.
"""

from __future__ import annotations

import logging

from slmops.server.context import Context, Every
from slmops.server.db.session import Database
from slmops.server.telemetry.cohorts import feed_metrics
from slmops.server.telemetry.drift import check_drift
from slmops.server.telemetry.store import flush_counters, prune

log = logging.getLogger("slmops.server.telemetry")


def telemetry_tick(db: Database, ctx: Context, *, slow: Every) -> None:
    """One round of telemetry work at ``ctx.now``; the slow part only when ``slow`` is due."""
    now = ctx.now
    with db.sessions() as session:
        try:
            flush_counters(session)
        except Exception:
            log.exception("flushing telemetry counters failed")
        try:
            feed_metrics(session, ctx)
        except Exception:
            session.rollback()
            log.exception("feeding telemetry to rollouts failed")
        if not slow.due(now):
            return
        try:
            check_drift(session, ctx.store, now=now)
            prune(session, now=now)
        except Exception:
            session.rollback()
            log.exception("telemetry drift check or retention failed")
