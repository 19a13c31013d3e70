"""The device API's background I/O, started and stopped with the app (its lifespan).

- invalidation (``server/invalidation.py``): hooked into the app's sessions, and on PostgreSQL a
  LISTEN connection, so cached check-ins are dropped when a change commits in any process;
- the batched device reader and ``last_seen`` writer (``server/checkin_reader.py``);
- the telemetry group-commit writer (``server/telemetry/writer.py``) and the app's ingestion
  counters, which the app's sessions carry (``telemetry.store.counters_of``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slmops.server.checkin_reader import CheckinReader
from slmops.server.db.session import Database
from slmops.server.invalidation import PUBLISHES, Invalidation
from slmops.server.telemetry.store import COUNTERS_KEY, Counters
from slmops.server.telemetry.writer import TelemetryWriter

LISTEN_WAIT_S = 5.0  # startup waits this long at most for the PostgreSQL listener


def start(app: Any, db: Database) -> Callable[[], None]:
    """Start the device API's background I/O for ``app`` on ``db``; returns what stops it.
    Call before anything else opens sessions on ``db`` (the ticker), so those notify too."""
    invalidation: Invalidation = app.state.invalidation
    counters = app.state.telemetry_counters = Counters()
    db.sessions.configure(info={COUNTERS_KEY: counters, PUBLISHES: True})
    invalidation.install(db.sessions)
    invalidation.listen(db.engine)
    reader = app.state.checkin_reader = CheckinReader(db.engine)
    writer = app.state.telemetry_writer = TelemetryWriter(db.engine, db.sessions, counters)
    reader.start()
    writer.start()
    invalidation.wait_live(LISTEN_WAIT_S)

    def stop() -> None:
        writer.stop()
        reader.stop()
        invalidation.stop()

    return stop
