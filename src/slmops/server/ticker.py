"""The periodic work of the control plane, in one place: the module that wires the domains.

Every ``interval`` seconds, the leading process (``server/leadership.py``: one per PostgreSQL
database, taken over within about one interval when it dies) runs, in this order:

1. blueprints left unsettled (``blueprints.settling.settle_behind``: an apply whose settler
   died, its lease lapsed, or whose settle failed a lease ago), each in a thread of its own;
2. rollout ticks (``rollouts.tick_all``: soak times, timeouts, scheduled starts);
3. telemetry (``telemetry.ticks.telemetry_tick``: cohort figures for metric gates every time;
   drift checks and retention when the app's slow clock is due);
4. the feedback rules over new alerts (``feedback.engine.process_alerts``).

Each step's failure is logged and the next still runs: an unreachable database or one bad
rollout must never stop the others. Processes that do not lead only retry the lead each
interval. Nothing imports this module but the app, so its imports may reach every domain.
"""

from __future__ import annotations

import logging
import threading

from slmops.server.blueprints.settling import settle_behind
from slmops.server.context import Services
from slmops.server.db.session import Database
from slmops.server.feedback.engine import process_alerts
from slmops.server.leadership import Always, Leadership, Role
from slmops.server.rollouts.service import tick_all
from slmops.server.telemetry.ticks import telemetry_tick

log = logging.getLogger("slmops.server.ticker")


class Ticker:
    """A daemon thread that runs the periodic work every ``interval`` seconds until stopped."""

    def __init__(
        self,
        db: Database,
        services: Services,
        *,
        interval: float,
        leadership: Leadership | None = None,
    ) -> None:
        self.db, self.services, self.interval = db, services, interval
        self.leadership: Leadership = leadership or Always()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)

    @property
    def role(self) -> Role:
        """``leader`` when this process runs the periodic work, else ``standby``."""
        return self.leadership.role

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.leadership.release()

    def run_once(self) -> bool:
        """One round, when this process leads; returns whether it did the work."""
        if not self.leadership.hold():
            return False
        services = self.services
        try:
            with self.db.sessions() as session:
                lease = services.settings.settle_lease_seconds
                settle_behind(session, self.db.sessions, services.context, lease_seconds=lease)
        except Exception:
            log.exception("settling blueprints left behind failed")
        try:
            tick_all(self.db, services.store, poll_seconds=services.poll_seconds)
        except Exception:  # e.g. the database is unreachable: try again next time
            log.exception("rollout tick failed")
        telemetry_tick(self.db, services.context(), slow=services.slow)
        try:
            with self.db.sessions() as session:
                process_alerts(session, services.context())
        except Exception:
            log.exception("feedback rules failed")
        return True

    def _run(self) -> None:
        try:
            self.leadership.hold()  # take the lead at once, so /healthz says who leads
        except Exception:
            log.exception("ticker leadership check failed")
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # never let the thread die: the next interval tries again
                log.exception("ticker round failed")
