"""Telemetry ingestion in group commits: the batches of many requests in one transaction.

Storing one batch costs a handful of statements (batch row, windows, hourly roll-up) and a
commit; done per request on a worker thread, the round trips, the commit and the thread hops
cost far more than the rows. So requests hand their parsed batch to one writer thread per
process (``store``, awaited on the event loop), which takes whatever is queued (up to
``MAX_BATCH``) and writes it in one transaction with few statements:

1. the batch rows in one ``INSERT ... ON CONFLICT (device_id, batch_id) DO NOTHING
   RETURNING`` (multi-row on SQLite, one JSON parameter on PostgreSQL: ``_insert_batches``):
   a batch not returned was stored before (a retry), so it is a duplicate, and nothing else
   of it is written (as ``store.store_batch`` does with its unique key);
2. every window row in one multi-row INSERT;
3. the hourly roll-up: the windows are merged per hourly key in memory, the existing rows read
   in one SELECT (``FOR UPDATE`` on PostgreSQL, so another process's writer waits for this
   commit; SQLite has one writer at a time), then inserted ``ON CONFLICT DO NOTHING`` (a row
   another process inserted meanwhile is read again and merged into) or updated ``WHERE
   revision = <read>`` in one statement (an executemany on SQLite; on PostgreSQL one UPDATE
   whose rows are one JSON parameter, as are the windows': ``db/recordset.py``). Should that
   hit fewer rows than it should, the whole group is rolled back and written again
   (``GROUP_ATTEMPTS``): concurrent API processes never lose a window.

Each request is answered after the commit, so an acknowledged batch is stored. When a group's
transaction fails, its batches are stored one by one (``store.store_batch``), so one bad batch
fails only its own request. Attribution is ``store.attribute``'s, from the device row read with
the credential and the device's action reports (read for the whole group in one query).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from slmops.protocol.telemetry import TelemetryBatch
from slmops.server.db.models import Device, DeviceAction, utcnow
from slmops.server.db.recordset import execute_rows, fetch_rows, insert_rows
from slmops.server.db.session import dialect_insert
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.store import (
    COUNTERS_KEY,
    MAX_MERGE_ATTEMPTS,
    UNKNOWN_CLASS,
    Counters,
    Stored,
    attributed,
    hour_of,
    in_time,
    store_batch,
)
from slmops.server.telemetry.tables import (
    TelemetryBatchRow,
    TelemetryHourlyRow,
    TelemetryWindowRow,
)

log = logging.getLogger("slmops.server.telemetry.writer")

MAX_BATCH = 200
GROUP_ATTEMPTS = 3  # a group that meets another process's merge is written again
COUNTERS_EVERY = 2.0  # seconds between counter flushes from the writer thread
_BATCHES = cast(Table, TelemetryBatchRow.__table__)
_WINDOWS = cast(Table, TelemetryWindowRow.__table__)
_HOURLY = cast(Table, TelemetryHourlyRow.__table__)
_ACTIONS = cast(Table, DeviceAction.__table__)
_KEY = ("hour", "device_id", "model", "version", "variant", "rollout_id", "adapter")
_BATCH_KEY = ("device_id", "batch_id")  # a batch stored twice is a retry
_BATCH_RETURNS = ("id", "device_id", "batch_id")
HourKey = tuple[float, str, str, str, str, str, str]


@dataclass
class _Job:
    key: str  # the credential digest the batch came with
    batch: TelemetryBatch
    now: float
    future: asyncio.Future[Stored]
    loop: asyncio.AbstractEventLoop
    result: Stored | BaseException | None = None
    device: Any = None  # its devices row (device_id, profile, active, previous, desired)


class UnknownDevice(LookupError):
    """No device holds the credential a batch came with (the route answers 401)."""


class TelemetryWriter:
    """One per app: ``start`` in the lifespan, ``stop`` drains what is queued."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        counters: Counters,
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.engine, self.sessions, self.counters = engine, sessions, counters
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.groups = self.stored = self.fallbacks = self.conflicts = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="slmops-telemetry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        self._flush_counters()

    async def store_for(
        self, key: str, batch: TelemetryBatch, *, now: float | None = None
    ) -> Stored:
        """Store ``batch`` for the device whose credential digest is ``key``; returns once it
        is committed. The writer reads the devices of the whole group in one query in its
        transaction, so a request costs one thread hop, not two (a read, then a write).
        Raises ``UnknownDevice`` when no device holds the credential."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Stored] = loop.create_future()
        when = time.time() if now is None else now
        self._queue.put(_Job(key, batch, when, future, loop))
        return await future

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        next_counts = time.monotonic() + COUNTERS_EVERY
        while True:
            try:
                first = self._queue.get(timeout=max(0.0, next_counts - time.monotonic()))
            except queue.Empty:
                first = _EMPTY
            if first is None:
                return
            jobs = [first] if first is not _EMPTY else []
            while len(jobs) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
            if jobs:
                self._group(jobs)
            if time.monotonic() >= next_counts:
                next_counts = time.monotonic() + COUNTERS_EVERY
                self._flush_counters()

    def _flush_counters(self) -> None:
        try:
            with self.sessions() as session:
                self.counters.flush(session)
        except Exception as exc:  # kept for the next flush
            log.warning("telemetry counter flush failed: %s", exc)

    def _group(self, jobs: list[_Job]) -> None:
        try:
            for attempt in range(GROUP_ATTEMPTS):
                try:
                    with self.engine.begin() as conn:
                        self._write(conn, jobs)
                    break
                except MergeConflict:
                    self.conflicts += 1
                    if attempt == GROUP_ATTEMPTS - 1:
                        raise
        except Exception as exc:
            log.warning("group of %d telemetry batches failed (%s); one by one", len(jobs), exc)
            self.fallbacks += 1
            for job in jobs:  # store_batch counts what it stores
                job.result = self._alone(job)
            _answer(jobs)
            return
        self.groups += 1
        for job in jobs:
            stored = job.result
            if isinstance(stored, Stored) and stored.duplicate:
                self.counters.bump("duplicate_batches", 1)
            elif isinstance(stored, Stored):
                self.stored += 1
                self.counters.bump("batches", 1)
                self.counters.bump("windows", stored.windows)
                self.counters.bump("dropped_windows", job.batch.dropped_windows)
        _answer(jobs)

    def _alone(self, job: _Job) -> Stored | BaseException:
        if isinstance(job.result, UnknownDevice):
            return job.result
        try:
            with self.sessions(info={COUNTERS_KEY: self.counters}) as session:
                device = session.scalar(select(Device).where(Device.credential_hash == job.key))
                if device is None:  # revoked or rotated since the group read it
                    return UnknownDevice("no device holds this credential")
                return store_batch(session, device, job.batch, now=job.now)
        except Exception as exc:
            return exc

    def _write(self, conn: Connection, jobs: list[_Job]) -> None:
        _devices(conn, jobs)
        seen: set[tuple[str, str]] = set()
        fresh: list[_Job] = []
        for job in jobs:
            if job.device is None:  # no device holds its credential (result: UnknownDevice)
                continue
            ident = (job.device.device_id, job.batch.batch_id)
            if ident in seen:  # the same batch twice in one group: the second is a retry
                job.result = Stored(job.batch.batch_id, 0, duplicate=True)
                continue
            seen.add(ident)
            fresh.append(job)
        if not fresh:
            return
        received = utcnow()
        rows = []
        for job in fresh:
            kept = [w for w in job.batch.windows if in_time(w, job.now)]
            job.result = Stored(
                job.batch.batch_id, len(kept), False, len(job.batch.windows) - len(kept)
            )
            rows.append(
                {
                    "device_id": job.device.device_id,
                    "batch_id": job.batch.batch_id,
                    "received_at": received,
                    "windows": len(kept),
                    "dropped_windows": job.batch.dropped_windows,
                    "samples": [s.model_dump(mode="json") for s in job.batch.samples] or None,
                }
            )
        ids = {(r.device_id, r.batch_id): r.id for r in _insert_batches(conn, rows)}
        known = _running(conn, [j for j in fresh if (j.device.device_id, j.batch.batch_id) in ids])
        windows: list[dict[str, Any]] = []
        merged: dict[HourKey, aggregate.Acc] = {}
        profiles: dict[HourKey, str] = {}
        for job in fresh:
            device_id = job.device.device_id
            pk = ids.get((device_id, job.batch.batch_id))
            if pk is None:
                job.result = Stored(job.batch.batch_id, 0, duplicate=True)
                continue
            profile = job.device.profile or UNKNOWN_CLASS
            desired = (job.device.desired or {}).get("model") or {}
            desired = desired if isinstance(desired, dict) else {}
            for window in (w for w in job.batch.windows if in_time(w, job.now)):
                dims, doc = attributed(known.get(device_id, []), desired, window, profile)
                windows.append(
                    {
                        "batch_pk": pk,
                        "device_id": device_id,
                        "start_ts": window.start,
                        "end_ts": window.end,
                        "aggregate": doc,
                        **dims,
                    }
                )
                hkey: HourKey = (
                    hour_of(window.start),
                    device_id,
                    dims["model"],
                    dims["version"],
                    dims["variant"],
                    dims["rollout_id"],
                    dims["adapter"],
                )
                acc = aggregate.from_window(doc)
                if hkey in merged:
                    aggregate.merge_into(merged[hkey], acc)
                else:
                    merged[hkey] = acc
                profiles[hkey] = profile
        if windows:
            _insert_windows(conn, windows)
        if merged:
            _roll_up(conn, merged, profiles)


_EMPTY: Any = object()


@dataclass(frozen=True)
class _Statements:
    """The group's statements, built once per dialect. Executed with a list of parameter sets,
    an INSERT ... RETURNING is sent as multi-row INSERTs by SQLAlchemy ("insertmanyvalues")
    from one cached compilation: ``.values(rows)`` would compile a new statement per group,
    which cost more than the rows."""

    batches: Any
    hourly: Any


_BY_DIALECT: dict[str, _Statements] = {}


def _statements(conn: Connection) -> _Statements:
    name = conn.dialect.name
    if name not in _BY_DIALECT:
        batches = dialect_insert(name, _BATCHES).on_conflict_do_nothing(
            index_elements=list(_BATCH_KEY)
        )
        hourly = dialect_insert(name, _HOURLY).on_conflict_do_nothing(index_elements=list(_KEY))
        _BY_DIALECT[name] = _Statements(
            batches=batches.returning(*(_BATCHES.c[n] for n in _BATCH_RETURNS)),
            hourly=hourly.returning(*(_HOURLY.c[n] for n in _KEY)),
        )
    return _BY_DIALECT[name]


_DEVICE_COLUMNS = ("device_id", "credential_hash", "profile", "active", "previous", "desired")
_DEVICES = cast(Table, Device.__table__)
_BY_KEY = select(*(_DEVICES.c[n] for n in _DEVICE_COLUMNS)).where(
    _DEVICES.c.credential_hash.in_(bindparam("keys", expanding=True))
)


def _devices(conn: Connection, jobs: list[_Job]) -> None:
    """Fill in the device of every job from its credential digest, in one query; a job whose
    credential no device holds gets ``UnknownDevice`` as its result."""
    keys = sorted({job.key for job in jobs})
    found = {r.credential_hash: r for r in conn.execute(_BY_KEY, {"keys": keys})}
    for job in jobs:
        job.device = found.get(job.key)
        if job.device is None:
            job.result = UnknownDevice("no device holds this credential")


def _running(conn: Connection, jobs: list[_Job]) -> dict[str, list[dict[str, str]]]:
    """``store.running`` for every device of the group, with one query for the reports."""
    wanted: dict[str, str] = {}
    out: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        dev = job.device
        out[dev.device_id] = [
            {k: str(m.get(k)) for k in ("name", "version", "variant")}
            for m in (dev.active, dev.previous)
            if isinstance(m, dict) and m.get("name") and m.get("version")
        ]
        want = (dev.desired or {}).get("model") or {}
        if isinstance(want, dict) and want.get("name") and want.get("version"):
            wanted[dev.device_id] = str(want["version"])
    if wanted:
        rows = conn.execute(_REPORTS, {"devices": sorted(wanted)})
        latest: dict[tuple[str, str], str] = {}
        for r in rows:
            latest[(r.device_id, r.version)] = r.state  # ordered: the last one wins
        for job in jobs:
            dev = job.device
            version = wanted.get(dev.device_id)
            if version is not None and latest.get((dev.device_id, version)) == "active":
                want = dev.desired["model"]
                known = {k: str(want.get(k)) for k in ("name", "version", "variant")}
                if known not in out[dev.device_id]:
                    out[dev.device_id].append(known)
    return out


_REPORTS = (
    select(_ACTIONS.c.device_id, _ACTIONS.c.version, _ACTIONS.c.state)
    .where(_ACTIONS.c.device_id.in_(bindparam("devices", expanding=True)))
    .order_by(_ACTIONS.c.updated_at)
)
_FOUND = (
    select(*(_HOURLY.c[n] for n in _KEY), _HOURLY.c.id, _HOURLY.c.aggregate, _HOURLY.c.revision)
    .where(
        _HOURLY.c.device_id.in_(bindparam("devices", expanding=True)),
        _HOURLY.c.hour.in_(bindparam("hours", expanding=True)),
    )
    .order_by(_HOURLY.c.id)
    .with_for_update()  # PostgreSQL: another writer waits for our commit
)
_MERGE = (
    update(_HOURLY)
    .where(_HOURLY.c.id == bindparam("row_id"), _HOURLY.c.revision == bindparam("seen"))
    .values(aggregate=bindparam("merged"), revision=bindparam("next"))
)
# PostgreSQL: the same update as one statement, its rows one JSON parameter (db/recordset.py)
_MERGE_ROWS = text(
    "UPDATE telemetry_hourly AS h SET aggregate = v.merged, revision = v.next "
    "FROM json_to_recordset(CAST(:rows AS json)) "
    "AS v(row_id integer, seen integer, merged json, next integer) "
    "WHERE h.id = v.row_id AND h.revision = v.seen"
)


def _merge(conn: Connection, params: list[dict[str, Any]]) -> int:
    """Write the merged hourly rows whose revision is still the one read; rows written."""
    if conn.dialect.name == "postgresql":
        return execute_rows(conn, _MERGE_ROWS, params)
    return int(conn.execute(_MERGE, params).rowcount)


# the batch rows' INSERT on PostgreSQL, spelled with the same key and columns as _statements'
_NEW_BATCHES = (
    f"ON CONFLICT ({', '.join(_BATCH_KEY)}) DO NOTHING RETURNING {', '.join(_BATCH_RETURNS)}"
)


def _insert_batches(conn: Connection, rows: list[dict[str, Any]]) -> list[Any]:
    """The group's batch rows; returns those inserted (id, device_id, batch_id): a batch not
    returned was stored before. On PostgreSQL one statement with the rows as one parameter:
    SQLAlchemy's multi-row INSERT spells out every value's placeholder, and past 4 KB of SQL
    psycopg parses that text again on every group (about 0.8 ms for 50 rows)."""
    if conn.dialect.name != "postgresql":
        return list(conn.execute(_statements(conn).batches, rows))  # multi-row, per 1,000
    return fetch_rows(conn, insert_rows(_BATCHES, tuple(rows[0]), _NEW_BATCHES), rows)


def _insert_windows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if conn.dialect.name != "postgresql":
        conn.execute(_WINDOWS.insert(), rows)
        return
    execute_rows(conn, insert_rows(_WINDOWS, tuple(rows[0])), rows)


def _roll_up(
    conn: Connection, merged: dict[HourKey, aggregate.Acc], profiles: dict[HourKey, str]
) -> None:
    """Merge each key's accumulator into its hourly row (see the module doc, step 3)."""
    todo = dict(merged)
    for _ in range(MAX_MERGE_ATTEMPTS):
        devices = sorted({k[1] for k in todo})
        hours = sorted({k[0] for k in todo})
        found = {
            tuple(r[: len(_KEY)]): (r.id, r.aggregate, r.revision)
            for r in conn.execute(_FOUND, {"devices": devices, "hours": hours})
        }
        missed: dict[HourKey, aggregate.Acc] = {}
        new = [k for k in sorted(todo) if k not in found]
        if new:
            rows = [
                dict(zip(_KEY, k, strict=True))
                | {"profile": profiles[k], "aggregate": todo[k], "revision": 0}
                for k in new
            ]
            inserted = {tuple(r) for r in conn.execute(_statements(conn).hourly, rows)}
            missed.update({k: todo[k] for k in new if k not in inserted})
        existing = sorted(k for k in todo if k in found)
        if existing:  # one executemany; a row another process changed meanwhile is not hit
            params = [
                {
                    "row_id": found[k][0],
                    "seen": found[k][2],
                    "merged": aggregate.merge_into(found[k][1], todo[k]),  # read just now
                    "next": found[k][2] + 1,
                }
                for k in existing
            ]
            written = _merge(conn, params)
            if written != len(params):
                raise MergeConflict(f"{len(params) - written} hourly row(s) changed")
        if not missed:
            return
        todo = missed  # inserted by another process meanwhile: merge into them
    raise MergeConflict(f"hourly roll-up: {MAX_MERGE_ATTEMPTS} conflicts in a row")


class MergeConflict(Exception):
    """Another process merged into an hourly row this group read: the group is written again."""


def _answer(jobs: list[_Job]) -> None:
    loops: dict[asyncio.AbstractEventLoop, list[_Job]] = defaultdict(list)
    for job in jobs:
        loops[job.loop].append(job)

    def settle(items: list[_Job]) -> None:
        for job in items:
            if job.future.done():
                continue
            if isinstance(job.result, Stored):
                job.future.set_result(job.result)
            else:
                job.future.set_exception(job.result or RuntimeError("telemetry not stored"))

    for loop, items in loops.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, items)
