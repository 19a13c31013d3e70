"""Writing telemetry: a batch, its windows and the hourly roll-up, in one transaction (the
ingestion counters are added in memory and flushed later, see ``Counters``); and pruning old
rows (retention). This is the one-batch path (and the fallback of ``writer.py``, which stores
the batches of many requests in one transaction on the hot path).

Idempotency: the batch row goes in first (``UNIQUE(device_id, batch_id)``); a retried batch
fails that insert, the transaction is rolled back, nothing else is written, and the duplicate is
counted. Two deliveries racing each other end the same way: on PostgreSQL the second insert
waits for the first transaction and then fails; on SQLite writers take turns.

Roll-up: each window is merged into the hourly row of (hour of its start, device, model,
version, variant, rollout, adapter). The merge inserts in a savepoint; when the row exists it is
read, merged and updated ``WHERE revision = <read>``, retried on a miss (another batch of the same
device merged first), so concurrent API processes never lose a window.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slmops.protocol.telemetry import TelemetryBatch, WindowAggregate
from slmops.server.db.models import Device, DeviceAction, utcnow
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.tables import (
    TelemetryBatchRow,
    TelemetryCounter,
    TelemetryHourlyRow,
    TelemetryWindowRow,
)

HOUR = 3600.0
MAX_MERGE_ATTEMPTS = 20
UNKNOWN_CLASS = "unknown"  # as server/rollouts/service.py names a device without a profile
MAX_AGE_S = 24 * 3600.0
"""Windows that started longer ago than this (server clock) are not stored: a device cannot
backfill the figures of a rollout wave or a drift check that were already read."""
MAX_AHEAD_S = 300.0
"""Windows starting later than this in the server's future are not stored (clock skew bound)."""
MAX_WINDOW_S = 86400.0  # the longest window a policy allows (TelemetryPolicy.window_seconds)
DIMS = ("model", "version", "variant", "rollout_id", "adapter")
"""The window's own dimensions, written back into its stored document as attributed."""


@dataclass(frozen=True)
class Stored:
    batch_id: str
    windows: int
    duplicate: bool
    skipped: int = 0


def hour_of(ts: float) -> float:
    return float(int(ts // HOUR) * HOUR)


COUNTERS_KEY = "slmops.telemetry_counters"


class Counters:
    """Ingestion counts kept in memory, added to ``telemetry_counters`` by ``flush``.

    Counters are hot rows: updating them inside every batch's transaction made concurrent
    deliveries wait on each other (and, updating several rows in one statement, deadlock on
    PostgreSQL). Each process adds its own deltas, so several processes still sum correctly;
    a crash loses at most what was counted since the last flush (a second or a tick). One per
    app, reached from its sessions (``counters_of``)."""

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()

    def bump(self, name: str, by: int) -> None:
        if by:
            with self._lock:
                self._pending[name] = self._pending.get(name, 0) + by

    def take(self) -> dict[str, int]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def flush(self, session: Session) -> None:
        """Add the pending counts, rows in a fixed order, and commit."""
        pending = self.take()
        if not pending:
            return
        try:
            for name in sorted(pending):
                session.execute(
                    update(TelemetryCounter)
                    .where(TelemetryCounter.name == name)
                    .values(value=TelemetryCounter.value + pending[name])
                    .execution_options(synchronize_session=False)
                )
            session.commit()
        except Exception:
            session.rollback()
            for name, by in pending.items():  # counted again at the next flush
                self.bump(name, by)
            raise


def counters_of(session: Session) -> Counters:
    """The app's counters (its session factory carries them), or the session's own."""
    counters = session.info.get(COUNTERS_KEY)
    if not isinstance(counters, Counters):
        counters = session.info[COUNTERS_KEY] = Counters()
    return counters


def flush_counters(session: Session) -> None:
    """Add the app's pending counts to ``telemetry_counters`` (see ``Counters``)."""
    counters_of(session).flush(session)


def in_time(window: WindowAggregate, now: float) -> bool:
    """Whether a window lies within the bounded clock skew (``MAX_AGE_S``, ``MAX_AHEAD_S``)."""
    if window.end - window.start > MAX_WINDOW_S:
        return False
    return now - MAX_AGE_S <= window.start <= now + MAX_AHEAD_S


def store_batch(
    session: Session, device: Device, batch: TelemetryBatch, *, now: float | None = None
) -> Stored:
    """Store ``batch`` for ``device`` and commit; a batch already stored changes nothing.

    Windows outside the clock-skew bounds are skipped (counted in ``Stored.skipped``), and each
    stored window is attributed from the server's record of the device (``attribute``)."""
    device_id = device.device_id
    profile = device.profile or UNKNOWN_CLASS
    now = time.time() if now is None else now
    windows = [w for w in batch.windows if in_time(w, now)]
    skipped = len(batch.windows) - len(windows)
    known = running(session, device) if windows else []
    desired = (device.desired or {}).get("model") or {}
    desired = desired if isinstance(desired, dict) else {}
    row = TelemetryBatchRow(
        device_id=device_id,
        batch_id=batch.batch_id,
        received_at=utcnow(),
        windows=len(windows),
        dropped_windows=batch.dropped_windows,
        samples=[s.model_dump(mode="json") for s in batch.samples] or None,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        counters_of(session).bump("duplicate_batches", 1)
        return Stored(batch.batch_id, 0, duplicate=True)
    for window in windows:
        dims, doc = attributed(known, desired, window, profile)
        session.add(
            TelemetryWindowRow(
                batch_pk=row.id,
                device_id=device_id,
                start_ts=window.start,
                end_ts=window.end,
                aggregate=doc,
                **dims,
            )
        )
        _roll_up(session, device_id, hour_of(window.start), dims, aggregate.from_window(doc))
    session.commit()
    counters = counters_of(session)
    counters.bump("batches", 1)
    counters.bump("windows", len(windows))
    counters.bump("dropped_windows", batch.dropped_windows)
    return Stored(batch.batch_id, len(windows), duplicate=False, skipped=skipped)


def running(session: Session, device: Device) -> list[dict[str, str]]:
    """What the server knows the device runs or ran last: its check-in's active and previous
    models, and its desired model once an action report said it became active there."""
    known = [
        {k: str(m.get(k)) for k in ("name", "version", "variant")}
        for m in (device.active, device.previous)
        if isinstance(m, dict) and m.get("name") and m.get("version")
    ]
    want = (device.desired or {}).get("model") or {}
    if isinstance(want, dict) and want.get("name") and want.get("version"):
        reported = session.scalar(
            select(DeviceAction.state)
            .where(
                DeviceAction.device_id == device.device_id, DeviceAction.version == want["version"]
            )
            .order_by(DeviceAction.updated_at.desc())
            .limit(1)
        )
        if reported == "active":
            known.append({k: str(want.get(k)) for k in ("name", "version", "variant")})
    return known


def attribution(
    known: list[dict[str, str]], desired: dict[str, Any], window: WindowAggregate
) -> dict[str, str | None]:
    """The fields of ``window`` the server overrides, labelling it from its own record of what
    the device runs (``running``).

    Model, version and variant are kept only when they name a model the server knows the
    device runs or ran (a window may predate a switch); anything else is stored unattributed
    (no model, version or rollout), so it counts in fleet totals but in no model's, version's or
    rollout's figures. The rollout id is always the server's: that of the desired model when the
    window's model and version are the desired ones. The adapter (``name:version``) is the
    device's claim, kept with an attributed model and dropped with an unattributed one: an
    adapter only means something over the model it was trained for."""
    claim = {"name": window.model, "version": window.version, "variant": window.variant}
    if claim not in known:
        return dict.fromkeys(DIMS)
    rollout = None
    if (desired.get("name"), desired.get("version")) == (window.model, window.version):
        rollout = _text(desired.get("rollout_id"))
    return {"rollout_id": rollout}


def attribute(
    known: list[dict[str, str]], desired: dict[str, Any], window: WindowAggregate
) -> WindowAggregate:
    """The window as the server labels it (``attribution``)."""
    return window.model_copy(update=attribution(known, desired, window))


def attributed(
    known: list[dict[str, str]], desired: dict[str, Any], window: WindowAggregate, profile: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """A window as it is stored: its dimension columns (``""`` for none, the hourly roll-up's
    key) and its JSON labelled by ``attribution``. Built from one dump of the window, without
    copying the model: this runs for every ingested window."""
    doc = window.model_dump(mode="json")
    doc.update(attribution(known, desired, window))
    dims = {k: doc[k] or "" for k in DIMS}
    for k in DIMS:
        doc[k] = dims[k] or None
    dims["profile"] = profile
    return dims, doc


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _roll_up(
    session: Session, device_id: str, hour: float, dims: dict[str, str], acc: aggregate.Acc
) -> None:
    key = (
        TelemetryHourlyRow.hour == hour,
        TelemetryHourlyRow.device_id == device_id,
        TelemetryHourlyRow.model == dims["model"],
        TelemetryHourlyRow.version == dims["version"],
        TelemetryHourlyRow.variant == dims["variant"],
        TelemetryHourlyRow.rollout_id == dims["rollout_id"],
        TelemetryHourlyRow.adapter == dims["adapter"],
    )
    for _ in range(MAX_MERGE_ATTEMPTS):
        found = session.execute(
            select(TelemetryHourlyRow.aggregate, TelemetryHourlyRow.revision).where(*key)
        ).first()
        if found is None:
            try:
                with session.begin_nested():
                    session.add(
                        TelemetryHourlyRow(
                            hour=hour, device_id=device_id, aggregate=acc, revision=0, **dims
                        )
                    )
                return
            except IntegrityError:
                continue  # inserted by another transaction meanwhile: merge into it
        merged = aggregate.merge(found.aggregate, acc)
        result = session.execute(
            update(TelemetryHourlyRow)
            .where(*key, TelemetryHourlyRow.revision == found.revision)
            .values(aggregate=merged, revision=found.revision + 1)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 1) == 1:
            return
    raise RuntimeError(f"hourly roll-up of {device_id}: {MAX_MERGE_ATTEMPTS} conflicts in a row")


def prune(
    session: Session, *, now: float, keep_windows_s: float = 14 * 86400, keep_hourly_s: float = 0
) -> int:
    """Retention: delete windows (and batch rows) older than ``keep_windows_s`` and, when
    ``keep_hourly_s`` > 0, hourly rows older than that. Queries still answer whole hours from the
    roll-up; only the partial hours at a range's edges need windows. Commits; returns rows gone.
    Batch rows go with their windows, so a batch retried after that long would be stored again.
    """
    cutoff = now - keep_windows_s
    gone = session.execute(delete(TelemetryWindowRow).where(TelemetryWindowRow.start_ts < cutoff))
    count = int(getattr(gone, "rowcount", 0) or 0)
    still = select(TelemetryWindowRow.batch_pk)
    session.execute(
        delete(TelemetryBatchRow).where(
            TelemetryBatchRow.received_at < datetime.fromtimestamp(cutoff, UTC),
            TelemetryBatchRow.id.not_in(still),
        )
    )
    if keep_hourly_s > 0:
        res = session.execute(
            delete(TelemetryHourlyRow).where(TelemetryHourlyRow.hour < now - keep_hourly_s)
        )
        count += int(getattr(res, "rowcount", 0) or 0)
    session.commit()
    return count
