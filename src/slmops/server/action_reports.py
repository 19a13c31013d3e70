"""POST /device/v1/actions, in groups per rollout: a wave's reports written a group at a time.

A device reports each install phase (downloading, verifying, installing, health-checking,
active or failed) to the rollout that told it, so a wave of N devices sends about 5N reports
within a few polls. One by one, each report was two transactions (its device row and action
row, then the rollout step under the rollout row's lock), and a 10,000-device rollout's reports
queued on that lock at about 50 a second. Here a report whose statuses all name one rollout is
handed to the app's ``Combiner`` (``server/combine.py``) under that rollout's id, and the
group's leader writes every report of the group in one transaction: the devices' ``last_seen``
and the model each now runs (``rollouts.service.note_running``), their action rows (one
upsert per key), then the rollout stepped with all the reports in order (``run_events``).

What is written is what the one-by-one path writes; only the transactions differ. A report
naming no rollout or several, an app without a combiner, and every report of a group that
failed take that path (``record_statuses``), so one bad report fails only its own request.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from slmops.protocol.device import ActionStatus
from slmops.server.checkin import bounded, record_statuses
from slmops.server.context import Context
from slmops.server.db.models import Device, DeviceAction, utcnow
from slmops.server.db.session import dialect_insert
from slmops.server.rollouts.machine import DeviceReport, RolloutEvent
from slmops.server.rollouts.service import note_running, run_events

_DEVICES = cast(Table, Device.__table__)
_ACTIONS = cast(Table, DeviceAction.__table__)
_SEEN = (
    update(_DEVICES)
    .where(_DEVICES.c.device_id == bindparam("d"))
    .values(last_seen=bindparam("seen"))
)
_RUNNING = (
    update(_DEVICES).where(_DEVICES.c.device_id == bindparam("d")).values(active=bindparam("run"))
)
_UNCHANGED: Any = object()
GROUP_KEY = "actions:"  # combiner keys: ``actions:<rollout id>``


@dataclass(frozen=True)
class Report:
    """One request's report, as the group writes it."""

    device_id: str
    statuses: tuple[ActionStatus, ...]
    seen: datetime
    running: Any = _UNCHANGED  # the device's ``active`` after this report, if it changed


def report_actions(
    session: Session, device: Device, actions: list[ActionStatus], ctx: Context
) -> None:
    """Record a device's action report (see the module docstring)."""
    rollouts = {a.rollout_id for a in actions}
    if ctx.reports is None or len(rollouts) != 1 or not next(iter(rollouts)):
        _one_by_one(session, device, actions, ctx)
        return
    before = device.active
    note_running(device, actions)
    item = Report(
        device.device_id,
        tuple(actions),
        utcnow(),
        device.active if device.active != before else _UNCHANGED,
    )
    session.rollback()  # nothing of this session is written: the group writes it
    rollout_id = str(next(iter(rollouts)))

    def group(items: Sequence[Report]) -> None:
        events: list[RolloutEvent] = [
            DeviceReport(
                device_id=r.device_id, state=s.state, failed_stage=s.stage, detail=s.detail
            )
            for r in items
            for s in r.statuses
        ]
        run_events(session, rollout_id, events, ctx, first=lambda s: _write(s, items))

    def alone(item: Report) -> None:
        row = session.scalar(select(Device).where(Device.device_id == item.device_id))
        if row is not None:  # gone meanwhile: nothing to record
            _one_by_one(session, row, list(item.statuses), ctx)

    ctx.reports.submit(GROUP_KEY + rollout_id, item, group, alone)


def _one_by_one(
    session: Session, device: Device, actions: list[ActionStatus], ctx: Context
) -> None:
    device.last_seen = utcnow()
    note_running(device, actions)  # the version it runs now, before the next check-in
    record_statuses(session, device, actions, dataclasses.replace(ctx, reports=None))


def _write(session: Session, items: Sequence[Report]) -> None:
    """The group's device and action rows, before its rollout step (same transaction)."""
    session.execute(_SEEN, [{"d": r.device_id, "seen": r.seen} for r in items])
    running = [{"d": r.device_id, "run": r.running} for r in items if r.running is not _UNCHANGED]
    if running:
        session.execute(_RUNNING, running)
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in items:  # one row per key: an upsert may not touch a row twice in one statement
        for s in r.statuses:
            key = (r.device_id, bounded(s.rollout_id or ""), bounded(s.version))
            latest[key] = {
                "device_id": key[0],
                "rollout_id": key[1],
                "version": key[2],
                "state": s.state.value,
                "stage": s.stage.value if s.stage else None,
                "detail": s.detail,
                "updated_at": r.seen,
            }
    session.execute(_upsert(session.get_bind().dialect.name), list(latest.values()))


@functools.cache
def _upsert(dialect_name: str) -> Any:
    """The action rows' upsert, built once per dialect (compiled once, then cached)."""
    stmt = dialect_insert(dialect_name, _ACTIONS)
    return stmt.on_conflict_do_update(
        index_elements=["device_id", "rollout_id", "version"],
        set_={c: stmt.excluded[c] for c in ("state", "stage", "detail", "updated_at")},
    )
