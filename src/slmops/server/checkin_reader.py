"""Batched device reads and ``last_seen`` writes for the idle check-in path.

A fleet's idle check-ins each need one indexed read (the device row by credential digest)
and, every half poll, one ``last_seen`` write. Done one request at a time, the cost is the
round trip, the pool checkout, the transaction begin and end and a thread hop per request,
not the read itself. So one thread per process does them for every request:

- ``lookup(key)`` (awaited on the event loop) queues the credential digest; the thread takes
  whatever is queued (up to ``MAX_BATCH``), reads all of it in one ``SELECT ... WHERE
  credential_hash IN (...)`` on its own autocommit connection, and resolves every waiting
  request with one call into the event loop. Under load a batch holds as many requests as
  arrived during the previous one; an idle server answers a lone request at once.
- ``seen(device_id, when)`` buffers a ``last_seen`` write; the thread flushes the buffer every
  ``FLUSH_SECONDS`` in one transaction (one executemany UPDATE). A crash loses at most that
  second of ``last_seen``, which is only shown as "last seen" and used to call devices stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, select, update

from slmops.server.db.models import Device

log = logging.getLogger("slmops.server.checkin_reader")

MAX_BATCH = 256
FLUSH_SECONDS = 1.0
_TABLE = cast(Table, Device.__table__)
COLUMNS = (
    "device_id",
    "credential_hash",
    "inventory",
    "labels",
    "profile",
    "active",
    "previous",
    "desired",
    "desired_etag",
    "last_seen",
)
_SELECT = select(*(_TABLE.c[name] for name in COLUMNS)).where(
    _TABLE.c.credential_hash.in_(bindparam("keys", expanding=True))
)
_SEEN = (
    update(_TABLE).where(_TABLE.c.device_id == bindparam("did")).values(last_seen=bindparam("seen"))
)
_Waiter = tuple[str, asyncio.Future[Any], asyncio.AbstractEventLoop]
_NOTHING: Any = object()  # the queue had nothing before it was time to flush


class CheckinReader:
    """One per app (``start`` in the lifespan, ``stop`` flushes what is buffered)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: queue.SimpleQueue[_Waiter | None] = queue.SimpleQueue()
        self._seen: dict[str, datetime] = {}
        self._seen_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self.batches = self.reads = self.flushes = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="slmops-checkins", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def lookup(self, key: str) -> Any:
        """The device row whose credential digest is ``key`` (``COLUMNS``), or None."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((key, future, loop))
        return await future

    def seen(self, device_id: str, when: float) -> None:
        """Write ``last_seen`` in the next flush (the latest time wins)."""
        with self._seen_lock:
            self._seen[device_id] = datetime.fromtimestamp(when, UTC)

    def flush(self) -> int:
        """Write the buffered ``last_seen`` values in one transaction; returns how many."""
        with self._seen_lock:
            pending, self._seen = self._seen, {}
        if not pending:
            return 0
        rows = [{"did": k, "seen": v} for k, v in sorted(pending.items())]
        try:
            with self.engine.begin() as conn:
                conn.execute(_SEEN, rows)
        except Exception:
            with self._seen_lock:  # written at the next flush, unless newer ones came
                for k, v in pending.items():
                    self._seen.setdefault(k, v)
            raise
        self.flushes += 1
        return len(rows)

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        next_flush = time.monotonic() + FLUSH_SECONDS
        while True:
            try:
                first = self._queue.get(timeout=max(0.0, next_flush - time.monotonic()))
            except queue.Empty:
                first = _NOTHING
            if first is None:
                return
            batch: list[_Waiter] = [first] if first is not _NOTHING else []
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            if batch:
                self._read(batch)
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + FLUSH_SECONDS
                try:
                    self.flush()
                except Exception as exc:  # kept for the next flush
                    log.warning("last_seen flush failed: %s", exc)

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def _read(self, batch: list[_Waiter]) -> None:
        keys = sorted({key for key, _, _ in batch})
        try:
            rows = self._connection().execute(_SELECT, {"keys": keys}).all()
        except Exception as exc:
            if self._conn is not None:
                self._conn.invalidate()
                self._conn.close()
                self._conn = None
            _resolve(batch, exc)
            return
        self.batches += 1
        self.reads += len(batch)
        found = {row.credential_hash: row for row in rows}
        _resolve(batch, found)


def _resolve(batch: list[_Waiter], result: dict[str, Any] | BaseException) -> None:
    """Hand each waiting request its row (or the error), one call per event loop."""
    loops: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Future[Any]]]] = {}
    for key, future, loop in batch:
        loops.setdefault(loop, []).append((key, future))

    def settle(items: list[tuple[str, asyncio.Future[Any]]]) -> None:
        for key, future in items:
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result.get(key))

    for loop, items in loops.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, items)
