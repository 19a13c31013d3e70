"""Rollout storage: a small summary on the rollout row, one ``rollout_devices`` row per device.

The pure machine (``rollouts/machine``) steps a ``RolloutState``; here that state is assembled from
the database with only the device records a step needs, and written back with only what
changed. A device report loads the summary and its own row and writes both back: the cost does
not grow with the fleet. The summary's tally keeps the counts gates and targets need. The few
steps that act on many devices (a wave start fills from every queued device, a rollback reverts
every moved one) raise ``NeedDevices``; ``load_kind`` then adds those rows, through the
(rollout, wave, status) index.

A document written before rows existed still holds its devices inline; it loads as a complete
state and the next write moves them into rows (migration 0008 splits stored ones up front).
Writes stay optimistic: the summary is updated ``WHERE revision =`` what was read, in the same
transaction as the device rows, so a concurrent step makes the whole write retry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from slmops.protocol.fleet import DeviceActionState
from slmops.server.db.models import utcnow
from slmops.server.rollouts.machine import DeviceRecord, RolloutState
from slmops.server.rollouts.tables import Rollout, RolloutDevice

CHUNK = 500  # ids per IN (...) query: well under every engine's parameter limit
TABLE: Table = RolloutDevice.__table__  # type: ignore[assignment]  # declared as FromClause
# Rows are read as plain rows (Core), never as ORM objects: a session's identity map would hand
# back stale objects after the bulk UPDATEs below.


class RolloutConflict(Exception):
    """Another process stepped the rollout between our read and our write: read again."""


@dataclass
class Loaded:
    """A state as read, and which of its device records already have a row."""

    state: RolloutState
    stored: set[str] = field(default_factory=set)
    inline: bool = False  # the document held its devices: every record is written as a row


def row_values(rollout_id: str, device_id: str, d: DeviceRecord) -> dict[str, Any]:
    """The ``rollout_devices`` columns of one record."""
    return {
        "rollout_id": rollout_id,
        "device_id": device_id,
        "status": d.status,
        "wave": d.wave,
        "hardware_class": d.hardware_class,
        "from_version": d.from_version,
        "skipped": d.skipped,
        "unplaceable": d.unplaceable,
        "assigned_at": d.assigned_at,
        "reverted_at": d.reverted_at,
        "state": d.state.value if d.state else None,
        "failed_stage": d.failed_stage.value if d.failed_stage else None,
        "detail": d.detail,
        "reported_at": d.reported_at,
    }


def record_of(r: Any) -> DeviceRecord:
    """A record from a ``rollout_devices`` row (any object with its columns as attributes).
    Built without validation: the row was written from a validated record (a wave start reads
    every queued row, so this runs up to once per device)."""
    return DeviceRecord.model_construct(
        hardware_class=r.hardware_class,
        from_version=r.from_version,
        skipped=r.skipped,
        unplaceable=r.unplaceable,
        wave=r.wave,
        assigned_at=r.assigned_at,
        reverted_at=r.reverted_at,
        state=DeviceActionState(r.state) if r.state else None,
        failed_stage=DeviceActionState(r.failed_stage) if r.failed_stage else None,
        detail=r.detail,
        reported_at=r.reported_at,
    )


def _rows(session: Session, rollout_id: str, ids: list[str]) -> dict[str, DeviceRecord]:
    found: dict[str, DeviceRecord] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        query = select(TABLE).where(TABLE.c.rollout_id == rollout_id, TABLE.c.device_id.in_(chunk))
        for r in session.execute(query):
            found[r.device_id] = record_of(r)
    return found


def load(session: Session, row: Rollout, device_ids: Iterable[str] = ()) -> Loaded:
    """The summary with the records of ``device_ids`` (those the rollout has)."""
    state = RolloutState.from_json(row.state_json)
    if state.devices:  # an inline document: already complete
        return Loaded(state, inline=True)
    records = _rows(session, row.id, sorted(set(device_ids)))
    partial = state.model_copy(update={"devices": records, "loaded": frozenset()})
    return Loaded(partial, set(records))


def load_kind(session: Session, loaded: Loaded, kind: str) -> Loaded:
    """``loaded`` plus every record of ``kind``: "queued" or "moved" (assigned, not reverted)."""
    state = loaded.state
    query = select(TABLE).where(TABLE.c.rollout_id == state.rollout_id)
    if kind == "queued":
        query = query.where(TABLE.c.wave.is_(None), TABLE.c.status == "queued")
    elif kind == "moved":
        query = query.where(TABLE.c.wave.is_not(None), TABLE.c.reverted_at.is_(None))
    else:
        raise ValueError(f"unknown device set {kind!r}")
    devices = dict(state.devices)
    stored = set(loaded.stored)
    for r in session.execute(query):
        if r.device_id not in devices:
            devices[r.device_id] = record_of(r)
            stored.add(r.device_id)
    have = state.loaded or frozenset()
    more = state.model_copy(update={"devices": devices, "loaded": have | {kind}})
    return Loaded(more, stored, loaded.inline)


def load_full(session: Session, row: Rollout) -> RolloutState:
    """Every record: for views and periodic work (telemetry cohorts), never per report."""
    state = RolloutState.from_json(row.state_json)
    if state.devices:
        return state
    return state.model_copy(update={"devices": records_of(session, row.id)})


def records_of(
    session: Session, rollout_id: str, device_ids: Iterable[str] | None = None
) -> dict[str, DeviceRecord]:
    """The rows of one rollout (only those of ``device_ids``, if given), as records."""
    if device_ids is not None:
        return _rows(session, rollout_id, sorted(set(device_ids)))
    query = select(TABLE).where(TABLE.c.rollout_id == rollout_id)
    return {r.device_id: record_of(r) for r in session.execute(query)}


def device_record(session: Session, rollout_id: str, device_id: str) -> DeviceRecord | None:
    """One device's row in one rollout, by primary key (not inline documents: see ``load``)."""
    query = select(TABLE).where(TABLE.c.rollout_id == rollout_id, TABLE.c.device_id == device_id)
    r = session.execute(query).first()
    return record_of(r) if r is not None else None


def page(
    session: Session,
    row: Rollout,
    *,
    limit: int,
    after: str | None = None,
    wave: int | None = None,
    status: str | None = None,
) -> tuple[list[tuple[str, DeviceRecord]], str | None]:
    """Up to ``limit`` records in device id order after ``after`` (only those in ``wave`` /
    with ``status``, when given), and the cursor of the next page (None: this is the last).

    A view reads one page through the primary key (rollout_id, device_id), never the whole
    fleet; the cursor is a device id, so a page stays stable while devices join or report.
    """
    if limit <= 0:  # counts only (the summary has them)
        return [], None
    state = RolloutState.from_json(row.state_json)
    if state.devices:  # an inline document (written before rows existed): filter it here
        chosen = [
            (i, d)
            for i, d in sorted(state.devices.items())
            if (after is None or i > after)
            and (wave is None or d.wave == wave)
            and (status is None or d.status == status)
        ]
    else:
        query = select(TABLE).where(TABLE.c.rollout_id == row.id)
        if after is not None:
            query = query.where(TABLE.c.device_id > after)
        if wave is not None:
            query = query.where(TABLE.c.wave == wave)
        if status is not None:
            query = query.where(TABLE.c.status == status)
        query = query.order_by(TABLE.c.device_id).limit(limit + 1)
        chosen = [(r.device_id, record_of(r)) for r in session.execute(query)]
    if len(chosen) > limit:
        chosen = chosen[:limit]
        return chosen, chosen[-1][0] if chosen else None
    return chosen, None


def known_ids(session: Session, row: Rollout, status: str | None = None) -> set[str]:
    """Every device the rollout has a record of (with ``status``: only those in it)."""
    state = RolloutState.from_json(row.state_json)
    if state.devices:
        return {i for i, d in state.devices.items() if status is None or d.status == status}
    query = select(TABLE.c.device_id).where(TABLE.c.rollout_id == row.id)
    if status is not None:
        query = query.where(TABLE.c.status == status)
    return set(session.scalars(query))


def summary_json(state: RolloutState) -> str:
    return state.model_copy(update={"devices": {}}).to_json()


# SET takes the columns named in the parameters (all but the key, renamed ``k_*`` here)
_UPDATE_ROW = update(TABLE).where(
    TABLE.c.rollout_id == bindparam("k_rollout"), TABLE.c.device_id == bindparam("k_device")
)


def save(session: Session, row: Rollout, loaded: Loaded, new: RolloutState) -> bool:
    """Write the summary (optimistically) and the records that changed; False: nothing did.

    Raises ``RolloutConflict`` when the row's revision moved since it was read; the caller
    rolls the transaction back, device rows included.
    """
    before = loaded.state.devices
    if loaded.inline:
        changed = sorted(new.devices)
    else:
        changed = sorted(i for i, d in new.devices.items() if before.get(i) is not d)
    text = summary_json(new)
    if not changed and text == row.state_json:
        return False
    result = session.execute(
        update(Rollout)
        .where(Rollout.id == row.id, Rollout.revision == row.revision)
        .values(
            state_json=text,
            status=new.status.value,
            revision=row.revision + 1,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 1) != 1:
        raise RolloutConflict(row.id)
    fresh = [row_values(row.id, i, new.devices[i]) for i in changed if i not in loaded.stored]
    known = [row_values(row.id, i, new.devices[i]) for i in changed if i in loaded.stored]
    for start in range(0, len(fresh), CHUNK):
        session.execute(insert(TABLE), fresh[start : start + CHUNK])
    if known:  # one executemany UPDATE by primary key (Core: no ORM bookkeeping per row)
        keyed = [
            {k: x for k, x in v.items() if k not in ("rollout_id", "device_id")}
            | {"k_rollout": v["rollout_id"], "k_device": v["device_id"]}
            for v in known
        ]
        session.execute(_UPDATE_ROW, keyed)
    return True


def forget_device(session: Session, row: Rollout, device_id: str) -> bool:
    """Drop one device's record and its counts (a deleted device); False: it had none.
    Optimistic like ``save``: raises ``RolloutConflict`` when the row moved."""
    loaded = load(session, row, [device_id])
    state = loaded.state
    if device_id not in state.devices:
        return False
    gone = state.devices[device_id]
    devices = {k: v for k, v in state.devices.items() if k != device_id}
    tally = state.tally.model_copy(deep=True)
    tally.count(gone, -1)
    new = state.model_copy(update={"devices": devices, "tally": tally})
    result = session.execute(
        update(Rollout)
        .where(Rollout.id == row.id, Rollout.revision == row.revision)
        .values(state_json=summary_json(new), revision=row.revision + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 1) != 1:
        raise RolloutConflict(row.id)
    if loaded.inline:
        rows = [row_values(row.id, i, d) for i, d in sorted(devices.items())]
        for start in range(0, len(rows), CHUNK):
            session.execute(insert(TABLE), rows[start : start + CHUNK])
    else:
        session.execute(
            delete(TABLE).where(TABLE.c.rollout_id == row.id, TABLE.c.device_id == device_id)
        )
    return True
