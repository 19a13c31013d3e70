"""A per-process cache that answers an idle fleet's check-ins without touching the database.

An idle device sends the same check-in body every poll and gets 304. After one full check-in,
the process remembers (credential digest -> device, ETag, body digest, when last_seen was
written). A later check-in with the same credential, the same body bytes and an If-None-Match
equal to the remembered ETag gets 304 straight from memory while the entry is fresh, and while
``last_seen`` does not need writing yet (``seen_every``); anything else takes the full path.

Entries are dropped when the device's desired state or credential changes
(``server/invalidation.py``): at once in the process that committed the change and, on
PostgreSQL, within milliseconds in every other API process (LISTEN/NOTIFY). So the entry
lifetime is only a safety net: ``SLMOPS_CHECKIN_CACHE_SECONDS`` (default 5 s; 0 turns the cache
off) without a cross-process listener (SQLite, or while the listener reconnects), and
``LISTENING_TTL`` (60 s) while one is live.

A check-in that read the database before an invalidation arrived does not cache what it read
(``epoch`` taken before the read, compared at ``put``), so a change racing a full check-in
cannot leave a stale entry behind. Its own commits are not such a change (its answer is
computed after them): the caller adds the drops they caused to ``epoch``
(``invalidation.own_drops``), so a device's first full check-in is cached too.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from slmops.server.invalidation import Invalidation

MAX_ENTRIES = 200_000
LISTENING_TTL = 60.0


@dataclass(frozen=True)
class Entry:
    device_id: str
    etag: str
    body_digest: bytes
    seen_at: float
    expires: float


class CheckinCache:
    def __init__(
        self,
        ttl: float,
        invalidation: Invalidation | None = None,
        *,
        max_entries: int = MAX_ENTRIES,
        listening_ttl: float = LISTENING_TTL,
    ) -> None:
        self.short_ttl, self.max_entries = ttl, max_entries
        self.listening_ttl = listening_ttl
        self.invalidation = invalidation or Invalidation()
        self.invalidation.subscribe(self.drop)
        self._entries: dict[str, Entry] = {}
        self._keys: dict[str, str] = {}  # device id -> credential digest of its entry
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def ttl(self) -> float:
        """Entry lifetime now: long while another process's changes reach us by NOTIFY."""
        if self.short_ttl <= 0:
            return 0.0
        return max(self.short_ttl, self.listening_ttl) if self.invalidation.live else self.short_ttl

    @property
    def epoch(self) -> int:
        return self.invalidation.epoch

    def hit(
        self,
        key: str,
        body_digest: bytes,
        etag: str | None,
        now: float,
        seen_every: float,
        *,
        count_miss: bool = True,
        seen: Callable[[str, float], None] | None = None,
    ) -> bool:
        """Whether the entry of ``key`` answers this check-in with 304. ``count_miss=False``
        for a first look whose miss is looked at again (and counted) by the route.

        An entry whose ``last_seen`` write is due (``seen_every``) still answers when ``seen``
        is given (the check-in reader's buffered write): it is called and the entry's clock
        restarts. Without it such a check-in goes to the route, which writes ``last_seen``.
        Before, a device polling less often than ``seen_every`` (every device of a fleet
        polling each minute: ``seen_every`` is at most 30 s) missed the cache on every poll."""
        entry = self._entries.get(key)
        ok = (
            entry is not None
            and etag is not None
            and entry.expires > now
            and entry.body_digest == body_digest
            and entry.etag == etag
        )
        if ok and entry is not None and now - entry.seen_at >= seen_every:
            if seen is None:
                ok = False
            else:
                seen(entry.device_id, now)
                with self._lock:  # unless it was dropped meanwhile
                    if self._entries.get(key) is entry:
                        self._entries[key] = dataclasses.replace(entry, seen_at=now)
        if ok:
            self.hits += 1
        elif count_miss:
            self.misses += 1
        return ok

    def put(self, key: str, entry: Entry, *, epoch: int) -> None:
        """Remember ``entry`` unless an invalidation arrived since ``epoch`` (read before the
        database was)."""
        if self.short_ttl <= 0:
            return
        with self._lock:
            if self.invalidation.epoch != epoch:
                return
            if len(self._entries) >= self.max_entries:
                now = time.time()
                self._entries = {k: e for k, e in self._entries.items() if e.expires > now}
                self._keys = {e.device_id: k for k, e in self._entries.items()}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                    self._keys.clear()
            old = self._keys.get(entry.device_id)
            if old is not None and old != key:
                self._entries.pop(old, None)
            self._entries[key] = entry
            self._keys[entry.device_id] = key

    def forget(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._keys.pop(entry.device_id, None)

    def drop(self, device_ids: set[str] | None) -> None:
        """Drop the entries of ``device_ids`` (None: every entry)."""
        with self._lock:
            if device_ids is None:
                self._entries.clear()
                self._keys.clear()
                return
            for device_id in device_ids:
                key = self._keys.pop(device_id, None)
                if key is not None:
                    self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
