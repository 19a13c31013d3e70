"""Which API process runs the ticker: exactly one per database.

On PostgreSQL the leader is the process holding a session-level advisory lock
(``pg_try_advisory_lock(TICKER_LOCK_KEY)``) on a connection of its own, kept open for the
process's lifetime outside the pool and in autocommit (never "idle in transaction"). Each
interval the leader checks that connection is alive (``SELECT 1``); when it died, leadership is
lost and tried again. PostgreSQL drops a session's advisory locks when the session ends, so
when the leader's process dies (even ``kill -9``: the kernel closes its socket) the lock is free
at once, and the next standby to retry (every interval) takes over within about one interval.
A leader that was cut off may tick once more before it notices; rollout steps are optimistic
writes and alerts are deduplicated, so a double tick is harmless, only wasted work.

On SQLite there is one host and normally one API process: every ticker runs (``Always``), as
before leadership existed. Running several processes on one SQLite file works but each ticks.
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

log = logging.getLogger("slmops.server.leadership")

TICKER_LOCK_KEY = 0x736C6D6F7073  # "slmops" in ASCII: one fixed key for every process
Role = Literal["leader", "standby"]


class Leadership(Protocol):
    """Asked by the ticker before each round of work."""

    @property
    def role(self) -> Role: ...

    def hold(self) -> bool:
        """Whether this process leads now (checking, or trying to take, the lead)."""
        ...

    def release(self) -> None: ...


class Always:
    """Leadership without a lock: this process always leads (SQLite, one process)."""

    role: Role = "leader"

    def hold(self) -> bool:
        return True

    def release(self) -> None:
        return None


class AdvisoryLock:
    """Leadership through a PostgreSQL session-level advisory lock (see the module docstring)."""

    def __init__(self, engine: Engine, key: int = TICKER_LOCK_KEY) -> None:
        # A one-connection engine of its own: the lock's session must outlive every pool
        # checkout, and must not take a slot from the request pool. Keepalives and a connect
        # timeout bound how long a dead link can go unnoticed.
        self._engine = create_engine(
            engine.url,
            poolclass=NullPool,
            connect_args={
                "connect_timeout": 5,
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 2,
            },
        )
        self.key = key
        self._conn: Connection | None = None
        self._leader = False

    @property
    def role(self) -> Role:
        return "leader" if self._leader else "standby"

    def hold(self) -> bool:
        if self._leader and self._alive():
            return True
        if self._leader:
            log.warning("ticker leadership lost: the lock's connection died; trying again")
            self._leader = False
        self._leader = self._try()
        if self._leader:
            log.info("this process now runs the ticker (advisory lock %d)", self.key)
        return self._leader

    def _alive(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            return True
        except Exception:
            self._drop()
            return False

    def _try(self) -> bool:
        try:
            if self._conn is None:
                conn = self._engine.connect()
                self._conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            got = self._conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key})
            return bool(got)
        except Exception as exc:  # database unreachable: standby, try again next interval
            log.warning("ticker leadership: cannot reach the database (%s)", type(exc).__name__)
            self._drop()
            return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:
                log.debug("closing the lock connection failed", exc_info=True)

    def release(self) -> None:
        """Give the lead up: unlock first (closing the connection alone frees the lock only
        when the backend notices the closed socket, which took long enough under load for a
        standby's next try to miss it), then close the session."""
        if self._leader and self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            except Exception:
                log.debug("unlocking the ticker lock failed; closing frees it", exc_info=True)
        self._leader = False
        self._drop()
        self._engine.dispose()


def for_engine(engine: Engine) -> Leadership:
    """Advisory-lock leadership on PostgreSQL; ``Always`` on anything else (SQLite)."""
    if engine.dialect.name == "postgresql":
        return AdvisoryLock(engine)
    return Always()
