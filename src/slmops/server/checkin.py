"""The check-in protocol as service functions: what a device reports, what it is told.

A check-in records what changed since the last one (inventory, labels, active and previous
models; ``last_seen`` at most every half poll, up to 30 s), feeds action statuses that name a
rollout to it (each may advance, pause or roll back the rollout), lets a device its blueprint's
active rollout does not know yet join it (late enrollment), and answers the desired state with
an ETag of its canonical JSON (304 when ``If-None-Match`` is that ETag).

Two paths, one protocol:

- **idle** (``idle_answer``): the device reports exactly what its row already holds, no action
  statuses, and its stored desired state is complete (it has an ETag, names the server's poll
  interval and no unplaceable reason, which a blob arriving later could lift). The stored
  desired state is then current: everything else that changes a device's desired state
  recomputes it when it happens (a blueprint apply or delete, a channel move, a rollout step,
  an operator label change, a re-enrollment, which clears the ETag). So an idle check-in is one indexed read (batched with
  other check-ins, ``server/checkin_reader.py``) and, at most every half poll, a ``last_seen``
  written in the next batched flush; it computes nothing.
- **full** (``record_checkin``): anything else goes through the ORM on a worker thread: record
  the changes, feed the reports, join a rollout, recompute, store. The store is conditional on
  the ETag read before the recompute (``server/desired_store.py``), so a wave change committed
  by another request meanwhile is never overwritten with this check-in's older document.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from slmops.protocol.device import ActionStatus, CheckIn, DesiredState
from slmops.server.context import Context
from slmops.server.db.models import Device, DeviceAction, as_utc, utcnow
from slmops.server.desired import Refresher, canonical, etag_of, refresh_devices
from slmops.server.invalidation import changed
from slmops.server.reconcile import join_if_matching
from slmops.server.rollouts.service import record_reports


@dataclass(frozen=True)
class Answer:
    """What a check-in is told: the desired state's ETag and JSON (``payload``), the device,
    and when its ``last_seen`` was last written (for the check-in cache)."""

    device_id: str
    etag: str
    payload: bytes | None  # None: not rendered (the caller's ETag matched)
    seen_at: float


def seen_every(poll_seconds: float) -> float:
    """How stale ``last_seen`` may get before an idle check-in writes it: half a poll, at most
    30 s (the dashboard calls a device stale after three missed polls)."""
    return min(30.0, poll_seconds / 2)


def etag_matches(header: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison over a comma-separated If-None-Match list (or ``*``)."""
    if not header:
        return False
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


@dataclass(frozen=True)
class Reported:
    """A check-in body in the shape the device row stores it."""

    inventory: dict[str, Any]
    labels: dict[str, str]
    profile: str | None
    active: dict[str, Any] | None
    previous: dict[str, Any] | None

    @classmethod
    def of(cls, body: CheckIn) -> Reported:
        return cls(
            inventory=body.inventory.model_dump(mode="json"),
            labels=dict(body.inventory.labels),
            profile=body.inventory.profile,
            active=body.active.model_dump(mode="json") if body.active else None,
            previous=body.previous.model_dump(mode="json") if body.previous else None,
        )


# --- idle ------------------------------------------------------------------------------------


def idle_answer(
    row: Any, body: CheckIn, if_none_match: str | None, *, now: float, poll_seconds: float
) -> tuple[Answer, bool] | None:
    """The answer to an idle check-in from the device's stored row, and whether ``last_seen``
    is due; None when the check-in is not idle (take ``record_checkin``).

    ``row`` has the ``devices`` columns ``checkin_reader.COLUMNS`` names."""
    if body.actions or not row.desired_etag or not row.desired:
        return None
    if row.desired.get("unplaceable"):
        return None  # a blob that arrived since may lift it: recompute
    if row.desired.get("poll_seconds") != poll_seconds:
        return None  # the server was restarted with another poll interval
    rep = Reported.of(body)
    if (
        row.inventory != rep.inventory
        or (row.labels or {}) != rep.labels
        or row.profile != rep.profile
        or row.active != rep.active
        or row.previous != rep.previous
    ):
        return None
    etag: str = row.desired_etag
    payload = None
    if not etag_matches(if_none_match, etag):
        payload = canonical(DesiredState.model_validate(row.desired))
        if etag_of(payload) != etag:
            return None  # stored before a schema change: recompute and store
    seen = as_utc(row.last_seen).timestamp() if row.last_seen else 0.0
    due = now - seen >= seen_every(poll_seconds)
    return Answer(row.device_id, etag, payload, now if due else seen), due


# --- full ------------------------------------------------------------------------------------


KEY_WIDTH = 64  # device_actions.rollout_id and .version are String(64)


def bounded(value: str, width: int = KEY_WIDTH) -> str:
    """``value`` as stored in a ``width``-character key column: unchanged when it fits, else
    cut and ended with ``~`` and 16 hex digits of its SHA-256, so two long values stay two
    keys. An adapter's status names ``adapter NAME:VERSION`` (names up to 255 characters),
    which PostgreSQL would refuse in the column (SQLite stores any length); the model versions
    readers look up there are at most 64 characters, so they are never cut."""
    if len(value) <= width:
        return value
    return value[: width - 17] + "~" + hashlib.sha256(value.encode()).hexdigest()[:16]


def record_actions(session: Session, device_id: str, actions: list[ActionStatus]) -> None:
    """Store each status as the device's latest for its (rollout, version), both bounded to
    their columns (``bounded``)."""
    now = utcnow()
    for status in actions:
        rollout_id, version = bounded(status.rollout_id or ""), bounded(status.version)
        row = session.scalar(
            select(DeviceAction).where(
                DeviceAction.device_id == device_id,
                DeviceAction.rollout_id == rollout_id,
                DeviceAction.version == version,
            )
        )
        if row is None:
            row = DeviceAction(device_id=device_id, rollout_id=rollout_id, version=version)
            session.add(row)
        row.state = status.state.value
        row.stage = status.stage.value if status.stage else None
        row.detail = status.detail
        row.updated_at = now


def record_statuses(
    session: Session, device: Device, actions: list[ActionStatus], ctx: Context
) -> None:
    """Store the statuses, then feed those naming a rollout to it (each commits)."""
    record_actions(session, device.device_id, actions)
    session.commit()
    if any(a.rollout_id for a in actions):
        record_reports(session, device.device_id, actions, ctx)


def record_checkin(
    session: Session, device: Device, body: CheckIn, ctx: Context, *, now: float
) -> Answer:
    """The full path: record what changed, feed reports, join a rollout, recompute, commit."""
    rep = Reported.of(body)
    etag_before = device.desired_etag
    reported_changed = (
        device.inventory != rep.inventory
        or device.labels != rep.labels
        or device.profile != rep.profile
        or device.active != rep.active
        or device.previous != rep.previous
    )
    # assign only what changed, so an idle check-in writes nothing but (rarely) last_seen
    if device.inventory != rep.inventory:
        device.inventory = rep.inventory
    if device.labels != rep.labels:
        device.labels = rep.labels
    if device.profile != rep.profile:
        device.profile = rep.profile
    if device.active != rep.active:
        device.active = rep.active
    if device.previous != rep.previous:
        device.previous = rep.previous
    seen = as_utc(device.last_seen).timestamp() if device.last_seen else 0.0
    if now - seen >= seen_every(ctx.poll_seconds):
        device.last_seen = utcnow()
        seen = now
    if body.actions:
        record_statuses(session, device, body.actions, ctx)
    if reported_changed:
        # The device's own row first, in its own transaction: joining a rollout takes the
        # rollout row's lock, and a rollout step holds that lock while it updates device rows
        # (lock order: rollout, then device; the other order can deadlock on PostgreSQL).
        # No ETag until recomputed below, so a crash in between takes the full path again.
        device.desired_etag = None
        session.commit()
    refresher = Refresher(session, ctx.store, poll_seconds=ctx.poll_seconds, targets=ctx.targets)
    join_if_matching(refresher, device, ctx)  # reads no rollout through the refresher's cache
    # Recomputed from a snapshot taken after the join (which may have assigned the device),
    # written only if nobody wrote the device meanwhile, else recomputed with its row locked
    # (desired_store.py): a wave change committed in another process while this check-in
    # computed is never overwritten by an older document.
    refresh_devices(
        session,
        ctx.store,
        poll_seconds=ctx.poll_seconds,
        device_ids={device.device_id},
        targets=ctx.targets,
    )
    doc = (
        DesiredState.model_validate(device.desired)
        if device.desired
        else DesiredState(device_id=device.device_id, poll_seconds=ctx.poll_seconds)
    )
    payload = canonical(doc)
    etag = etag_of(payload)
    fixed = device.desired_etag != etag and _fix_etag(session, device, etag)
    if etag != etag_before and (reported_changed or fixed):
        # our own writes (the cleared ETag above, the fix): other processes' cached answers
        # carry the old one; a recompute's write marked itself (store_desired)
        changed(session, device.device_id)
    session.commit()  # cheap when nothing was written
    return Answer(device.device_id, etag, payload, seen)


def _fix_etag(session: Session, device: Device, etag: str) -> bool:
    """Store the ETag of the stored document as re-rendered (a document stored before a
    schema change renders differently), if nobody wrote the device since it was read."""
    done = session.execute(
        update(Device)
        .where(Device.device_id == device.device_id)
        .where(Device.desired_etag.is_not_distinct_from(device.desired_etag))
        .values(desired_etag=etag)
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], done).rowcount:
        return False
    set_committed_value(device, "desired_etag", etag)
    return True


def parse(raw: bytes) -> CheckIn:
    """The check-in body (pydantic's ValidationError when it does not validate)."""
    return CheckIn.model_validate_json(raw)
