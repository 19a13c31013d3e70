"""A per-process cache that answers an idle fleet's check-ins without touching the database.

An idle device sends the same check-in body every poll and gets 304. After one full check-in,
the process remembers (credential digest -> device, ETag, body digest, when last_seen was
written). A later check-in with the same credential, the same body bytes and an If-None-Match
equal to the remembered ETag gets 304 straight from memory while the entry is fresh, and while
``last_seen`` does not need writing yet (``seen_every``); anything else takes the full path.

Staleness is bounded: entries live ``ttl`` seconds (``SLMOPS_CHECKIN_CACHE_SECONDS``, default
5 s; 0 turns the cache off), and a desired-state change written by this process
(``desired.CHANGES``) or a re-enrollment here invalidates every entry at once. A change made by
another API process reaches a device at most ``ttl`` seconds late, and a rotated credential
keeps working on other processes for at most ``ttl`` seconds; both are small beside a poll
interval of a minute.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from slmops.server.desired import CHANGES

MAX_ENTRIES = 200_000


@dataclass(frozen=True)
class Entry:
    device_id: str
    etag: str
    body_digest: bytes
    seen_at: float
    changes: int
    expires: float


class CheckinCache:
    def __init__(self, ttl: float, *, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def hit(
        self, key: str, body_digest: bytes, etag: str | None, now: float, seen_every: float
    ) -> bool:
        entry = self._entries.get(key)
        ok = (
            entry is not None
            and etag is not None
            and entry.expires > now
            and entry.changes == CHANGES[0]
            and entry.body_digest == body_digest
            and entry.etag == etag
            and now - entry.seen_at < seen_every
        )
        if ok:
            self.hits += 1
        else:
            self.misses += 1
        return ok

    def put(self, key: str, entry: Entry) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                now = time.time()
                self._entries = {k: e for k, e in self._entries.items() if e.expires > now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[key] = entry

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)
