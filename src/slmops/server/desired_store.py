"""Conditional writes of a device's desired state: a recompute never overwrites a newer one.

A desired state is computed from a snapshot of several tables (blueprints, the latest rollout
and the device's record in it, stable versions, registry tags), read one statement at a time.
Two recomputes of one device can overlap: a settle after an apply reads the rollouts, a wave
change in another request or process (``rollouts.run_event``) assigns the device and commits
its new desired state, then the settle writes the document it computed from the older rollout
over it; the idle check-in path would serve that stale document until the next change.

So a write is a compare-and-set on the ETag: ``UPDATE devices SET desired, desired_etag WHERE
device_id = ? AND desired_etag IS NOT DISTINCT FROM <the ETag read before the snapshot>``.
It succeeds only when nobody wrote the device between the read and the write, and so its
snapshot is at least as new as the one behind the document it replaces. The rows a batch
changed are read back in the same transaction: after a successful UPDATE the writer holds the
row (PostgreSQL's row lock, SQLite's write lock) until it commits, so what it reads back is
exact; on PostgreSQL an UPDATE that meets a row another transaction is changing waits for it
and re-checks the condition against the committed row (READ COMMITTED), so it never overwrites
that writer's document.

A miss is not simply skipped: the other writer may have computed from a snapshot older than
ours (a check-in that read the blueprints before an apply committed, finishing after the apply's
settle read the device). ``desired.refresh_devices`` recomputes the missed devices once more
after taking their row locks (``lock``: the same no-op UPDATE as ``run_event`` uses on the
rollout row, a row lock on PostgreSQL and the write lock on SQLite), so the second snapshot is
taken after every other writer of those rows has committed and nobody can write between it and
the write: the last document written is computed from the newest snapshot. Taking the locks
only on a miss keeps the common path free of extra waits. A writer that cannot recompute
(``store_desired`` called on its own) clears the ETag instead on a miss, which makes the next
check-in take the full path and recompute from current rows.

Only writes that happened mark the device for cross-process invalidation (``changed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from slmops.server.db.models import Device
from slmops.server.invalidation import changed

PENDING = "slmops.desired_pending"  # session info: writes a batch recompute gathers
_TABLE = cast(Table, Device.__table__)
_CAS = (
    update(_TABLE)
    .where(
        _TABLE.c.device_id == bindparam("did"),
        _TABLE.c.desired_etag.is_not_distinct_from(bindparam("seen")),
    )
    .values(desired=bindparam("doc", type_=_TABLE.c.desired.type), desired_etag=bindparam("etag"))
)


@dataclass(frozen=True)
class Write:
    """One desired state to store: ``seen`` is the ETag read before its snapshot was taken."""

    device: Device
    doc: dict[str, Any]
    etag: str
    seen: str | None


def write(session: Session, writes: list[Write]) -> list[Write]:
    """Store each document if its device still has the ETag it was computed against (in
    device id order: concurrent batches lock rows in the same order); returns the misses."""
    if not writes:
        return []
    writes = sorted(writes, key=lambda w: w.device.device_id)
    session.flush()  # rows the session holds pending exist, and its own changes are in first
    conn = session.connection()
    params = [
        {"did": w.device.device_id, "seen": w.seen, "doc": w.doc, "etag": w.etag} for w in writes
    ]
    conn.execute(_CAS, params)
    ids = [w.device.device_id for w in writes]
    query = select(_TABLE.c.device_id, _TABLE.c.desired_etag).where(_TABLE.c.device_id.in_(ids))
    stored: dict[str, str | None] = {r.device_id: r.desired_etag for r in conn.execute(query)}
    misses = []
    for w in writes:
        if stored.get(w.device.device_id) != w.etag:
            misses.append(w)
            continue
        # the row holds what we wrote (or someone wrote the very same document): keep the
        # object in step without the ORM writing it again
        set_committed_value(w.device, "desired", w.doc)
        set_committed_value(w.device, "desired_etag", w.etag)
        changed(session, w.device.device_id)
    return misses


def lock(session: Session, device_ids: Iterable[str]) -> None:
    """Write-lock the devices' rows (one at a time, in id order, so two lockers never wait
    on each other in a cycle) until the transaction ends."""
    for device_id in sorted(set(device_ids)):
        session.execute(
            update(_TABLE)
            .where(_TABLE.c.device_id == device_id)
            .values(desired_etag=_TABLE.c.desired_etag)
        )


def clear(session: Session, device: Device) -> None:
    """Drop the device's ETag (its next check-in takes the full path and recomputes)."""
    session.execute(
        update(_TABLE).where(_TABLE.c.device_id == device.device_id).values(desired_etag=None)
    )
    set_committed_value(device, "desired_etag", None)
    session.expire(device, ["desired"])
    changed(session, device.device_id)
