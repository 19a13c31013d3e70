"""Which devices' desired state (or credential) changed: told to every API process at once.

Writers do not call the check-in cache; they mark the change on their session
(``changed(session, device_id)``, or ``device_id=None`` for "any device"). Then:

- on PostgreSQL, an API process sends ``pg_notify('slmops_desired', payload)`` right after the
  commit, from a thread of its own that puts whatever was committed meanwhile in one
  notification (``Invalidation._send``); a session without an app (a CLI command) sends it
  inside its transaction instead (``notify_on_commit``, installed by ``open_database``), which
  PostgreSQL delivers only if it commits. Either way no process hears of a change that did not
  happen. Every API process LISTENs on one
  background connection (``Invalidation.listen``) and drops what the payload names:
  comma-separated device ids, or ``*`` (everything: too many ids for one payload, or a change
  that is not about one device);
- in the process that commits, the ids are dropped at once (``Invalidation.install``, the
  ``after_commit`` hook); a rolled-back change drops nothing.

A listener that loses its connection drops everything when it is back (notifications sent
meanwhile are lost), and while it is down ``live`` is false, so the cache falls back to its
short entry lifetime. SQLite has no LISTEN: a SQLite deployment is one process (or accepts the
short lifetime as its staleness bound), and invalidation stays in-process.

``epoch`` counts invalidations seen by this process: a check-in that read the database before
an invalidation arrived must not cache what it read (see ``CheckinCache.put``). Two kinds do
not count against a check-in, because its answer already reflects them:

- its own commits (a first check-in stores the device's first desired state): the session
  counts the drops its commits caused (``own_drops``) and the check-in expects the epoch to
  have moved by exactly that much;
- this process's own NOTIFYs heard back: an API process tags what it sends with its
  ``origin`` (``ids,@origin``) and its listener skips its own (counted in ``echoes``), since
  they were dropped locally at commit already. Otherwise the echo of a first check-in's write
  arrived milliseconds later and dropped the entry that check-in had just cached. The tag is
  a last list item no device id can be (ids begin with a letter or digit), so a process of an
  older version, reading it as one more id, still drops the ids; ``*`` is sent untagged, as
  those read it, and so is not skipped (it is rare: too many ids, or not about one device).

Both used to count, so a device was cached only from its second poll.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("slmops.server.invalidation")

CHANNEL = "slmops_desired"
EVERYTHING = "*"
MAX_PAYLOAD = 7000  # PostgreSQL refuses payloads of 8000 bytes or more
_KEY = "slmops.changed"
_COMMITTING = "slmops.committing"
_OWN = "slmops.own_drops"
PUBLISHES = "slmops.publishes"  # session info: an app's Invalidation sends the NOTIFY after commit

Drop = Callable[[set[str] | None], None]  # device ids to drop, or None for everything


def changed(session: Session | None, device_id: str | None) -> None:
    """Mark a change of ``device_id``'s desired state or credential (None: any device) on
    ``session``; it takes effect (locally and, on PostgreSQL, everywhere) when it commits."""
    if session is None:
        return
    pending: set[str] = session.info.setdefault(_KEY, set())
    pending.add(EVERYTHING if device_id is None else device_id)


def payload_of(ids: set[str]) -> str:
    """The NOTIFY payload for ``ids``: the ids, or ``*`` when there are too many (or ``*``)."""
    if EVERYTHING in ids:
        return EVERYTHING
    joined = ",".join(sorted(ids))
    return joined if len(joined) <= MAX_PAYLOAD else EVERYTHING


def parse_payload(payload: str) -> set[str] | None:
    """Device ids a payload names, or None (everything)."""
    ids = split_origin(payload)[1]
    if not ids or ids == EVERYTHING:
        return None
    return {p for p in ids.split(",") if p}


def tagged(origin: str, ids: set[str]) -> str:
    """The payload an API process sends: ``payload_of(ids)`` and ``,@origin`` last (``*``
    alone, untagged: see the module docstring)."""
    payload = payload_of(ids)
    return payload if payload == EVERYTHING else f"{payload},@{origin}"


def split_origin(payload: str) -> tuple[str | None, str]:
    """The sender's origin (None: untagged, e.g. a CLI command's) and the ids part."""
    ids, _, last = payload.rpartition(",")
    if last.startswith("@"):
        return last[1:], ids
    return None, payload


def own_drops(session: Session) -> int:
    """How many invalidations this session's own commits caused in this process so far."""
    return int(session.info.get(_OWN, 0))


def notify_on_commit(sessions: sessionmaker[Session], engine: Engine) -> None:
    """On PostgreSQL, a transaction that marked changes also sends them with ``pg_notify``
    (delivered when, and only if, it commits); on any database the marks are handed to the
    ``after_commit`` hook of an app's ``Invalidation``, and forgotten on rollback. Installed by
    ``open_database``, so a CLI command's changes reach the API processes too."""
    postgres = engine.dialect.name == "postgresql"

    @event.listens_for(sessions, "before_commit")
    def _notify(session: Session) -> None:
        pending: set[str] | None = session.info.pop(_KEY, None)
        if not pending:
            session.info.pop(_COMMITTING, None)
            return
        session.info[_COMMITTING] = pending
        if postgres and not session.info.get(PUBLISHES):
            session.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": payload_of(pending)},
            )

    @event.listens_for(sessions, "after_soft_rollback")
    def _rolled_back(session: Session, _previous: Any) -> None:
        if not session.in_transaction():  # the whole transaction (not a savepoint) is gone
            session.info.pop(_KEY, None)
            session.info.pop(_COMMITTING, None)


class Invalidation:
    """One per app: counts invalidations and forwards them to whoever holds cached answers."""

    def __init__(self) -> None:
        self.epoch = 0
        self.live = False  # a PostgreSQL listener is connected: other processes' changes arrive
        self.received = 0  # notifications heard from the database (all processes, this one too)
        self.echoes = 0  # of those, this process's own (skipped: dropped at commit already)
        self.origin = secrets.token_hex(8)  # tags this process's NOTIFYs
        self._subscribers: list[Drop] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._up = threading.Event()
        self._thread: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._outbox: queue.SimpleQueue[set[str]] = queue.SimpleQueue()

    def subscribe(self, drop: Drop) -> None:
        self._subscribers.append(drop)

    def drop(self, ids: set[str] | None) -> None:
        """Forget cached answers for ``ids`` (None: all) in this process."""
        with self._lock:
            self.epoch += 1
        for drop in self._subscribers:
            drop(ids)

    # --- sessions -----------------------------------------------------------------------------

    def install(self, sessions: sessionmaker[Session]) -> None:
        """Drop this process's cached answers when a session of ``sessions`` commits changes
        (``notify_on_commit``, installed on every database, hands them over)."""

        @event.listens_for(sessions, "after_commit")
        def _committed(session: Session) -> None:
            ids: set[str] | None = session.info.pop(_COMMITTING, None)
            if ids:
                self.drop(None if EVERYTHING in ids else ids)
                session.info[_OWN] = own_drops(session) + 1
                if self._thread is not None:  # PostgreSQL: tell the other processes
                    self._outbox.put(ids)

    # --- the PostgreSQL listener --------------------------------------------------------------

    def listen(self, engine: Engine) -> None:
        """Start the LISTEN thread (PostgreSQL only; a no-op otherwise)."""
        if engine.dialect.name != "postgresql" or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(engine,), name="slmops-invalidation", daemon=True
        )
        self._thread.start()
        self._sender = threading.Thread(
            target=self._send, args=(engine,), name="slmops-notify", daemon=True
        )
        self._sender.start()

    def wait_live(self, timeout: float) -> bool:
        """Until the listener is connected (startup: so the first answers can be cached)."""
        if self._thread is not None:
            self._up.wait(timeout)
        return self.live

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._sender, self._thread):
            if thread is not None:
                thread.join(timeout=5)
        self._thread = self._sender = None
        self.live = False

    def _send(self, engine: Engine) -> None:
        """Send what this process committed, everything queued in one NOTIFY, on a connection
        of its own: the committing transactions never wait on PostgreSQL's notification queue
        lock (a NOTIFY inside them serializes their commits). A crash between a commit and its
        NOTIFY leaves other processes' entries to their 60 s lifetime."""
        conn: Connection | None = None
        while not (self._stop.is_set() and self._outbox.empty()):
            try:
                ids = self._outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            while True:
                try:
                    ids |= self._outbox.get_nowait()
                except queue.Empty:
                    break
            for _ in range(2):
                try:
                    if conn is None:
                        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                    conn.execute(
                        text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": CHANNEL, "payload": tagged(self.origin, ids)},
                    )
                    break
                except Exception as exc:  # reconnect once, then give up on this one
                    log.warning("invalidation NOTIFY failed: %s", exc)
                    if conn is not None:
                        conn.invalidate()
                        conn.close()
                        conn = None
        if conn is not None:
            conn.close()

    def _run(self, engine: Engine) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._listen_once(engine)
                backoff = 0.2
            except Exception as exc:  # the listener must outlive any failure
                if self._stop.is_set():
                    break
                log.warning("invalidation listener: %s; reconnecting", exc)
            if self.live:
                self.live = False
            self.drop(None)  # whatever was sent while we were not listening is lost
            self._stop.wait(backoff)
            backoff = min(5.0, backoff * 2)

    def _listen_once(self, engine: Engine) -> None:
        raw = engine.raw_connection()
        raw.detach()  # ours alone: never handed back to the pool
        conn: Any = raw.dbapi_connection
        try:
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
            self.drop(None)  # changes before LISTEN took effect were not heard
            self.live = True
            self._up.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    self.received += 1
                    if split_origin(note.payload)[0] == self.origin:
                        self.echoes += 1  # dropped when it committed here
                        continue
                    self.drop(parse_payload(note.payload))
                if conn.closed:
                    raise ConnectionError("listener connection closed")
        finally:
            self.live = False
            raw.close()
