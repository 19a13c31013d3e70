"""Rollouts on the control plane: the I/O around the pure machine in ``rollouts/machine``.

A rollout is created when a blueprint's release changes: its resolved version (an apply, or a
channel it follows moving) or its adapter assignments (``server/reconcile.py``). From then on
the machine is fed events: device reports (from check-ins and ``/device/v1/actions``), late
enrollments (a matching device not yet in it), operator commands, and ticks from the ticker
(``server/ticker.py``: soak and timeouts). Its commands are carried out by recomputing the desired state of the
devices they name (``server/desired.py`` reads the stored rollout, so no device can be told two
things), and a rollout that succeeds makes its release (version and adapters) the blueprint's stable one.

Storage (``rollouts/store.py``): a small summary on the rollout row and one row per
device, so a device report reads and writes its own row plus the summary. Writes are optimistic:
``run_event`` re-reads the row, steps, and updates ``WHERE revision =`` what it read; on a miss
(another process stepped first) it rolls back and tries again. A restart loses nothing: the
summary and the device rows are the whole memory of a rollout.

Every device a rollout's blueprint governs is accounted for in it: moved (assigned by a wave),
skipped (already on the target by its last check-in or action report, whichever is later:
``desired.current_version``) or unplaceable (with the reason counted). A device changes version
only by a rollout's assignment (``desired.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from slmops.protocol.device import ActionStatus, ActiveModel
from slmops.protocol.fleet import DeviceActionState
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.models import Device
from slmops.server.db.session import Database
from slmops.server.desired import latest_rollout, refresh_devices
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts import store as rows
from slmops.server.rollouts.machine import (
    AssignTarget,
    DeviceReport,
    DevicesMatched,
    NeedDevices,
    RevertDevice,
    RolloutCommand,
    RolloutEvent,
    RolloutState,
    RolloutStatus,
    StateChanged,
    Tick,
    step,
)
from slmops.server.rollouts.store import RolloutConflict
from slmops.server.rollouts.tables import Rollout

log = logging.getLogger("slmops.server.rollouts")
MAX_ATTEMPTS = 20
SETTLE_BATCH = 1_000  # devices recomputed per transaction by ``settle``
UNKNOWN_CLASS = "unknown"
REVOKED = "revoked"  # identity.REVOKED (identity imports this module)
NO_EARLIER_VERSION = "nothing to revert to (no model before the rollout): keeps what it runs"


def active_rollout(session: Session, blueprint: str) -> Rollout | None:
    row = latest_rollout(session, blueprint)
    return row if row is not None and not RolloutStatus(row.status).is_terminal else None


def hardware_class(device: Device) -> str:
    return device.profile or UNKNOWN_CLASS


# --- stepping ---------------------------------------------------------------------------------


def _step_all(
    state: RolloutState, event: RolloutEvent, now: float
) -> tuple[RolloutState, list[RolloutCommand]]:
    """``step``, plus the reports the server makes itself: a device told to revert to "no
    model" keeps what it runs (never left without a model), so its revert is done at once."""
    new, commands = step(state, event, now)
    pending = [c for c in commands if isinstance(c, RevertDevice) and c.to_version is None]
    for c in pending:
        report = DeviceReport(
            device_id=c.device_id, state=DeviceActionState.ROLLED_BACK, detail=NO_EARLIER_VERSION
        )
        new, more = step(new, report, now)
        commands += more
    return new, commands


def apply_event(
    session: Session, row: Rollout, event: RolloutEvent, ctx: Context
) -> list[RolloutCommand]:
    """Step one stored rollout and carry out the commands, in the caller's transaction.

    Raises ``RolloutConflict`` when the row changed since it was read, and the machine's
    ``InvalidTransition`` for an operator command the state does not allow (nothing written).
    """
    return apply_events(session, row, [event], ctx)


def apply_events(
    session: Session, row: Rollout, events: Sequence[RolloutEvent], ctx: Context
) -> list[RolloutCommand]:
    """``apply_event`` for several events in order, with one read and one write: the machine
    is pure, so stepping a group is stepping each in turn from the state the last one left."""
    loaded = rows.load(session, row, [d for e in events for d in _named(e)])
    for _ in range(len(events) + 3):  # each kind of device set is loaded once at most
        try:
            new, commands = loaded.state, []
            for event in events:
                new, more = _step_all(new, event, ctx.now)
                commands += more
            break
        except NeedDevices as need:  # a wave start or a rollback: load that set and step again
            loaded = rows.load_kind(session, loaded, need.kind)
    else:  # pragma: no cover - the machine asks for each set once
        raise RuntimeError(f"rollout {row.id}: the machine kept asking for devices")
    blueprint = row.blueprint  # read before the row is expired (no reload just for this)
    if not rows.save(session, row, loaded, new):
        return commands
    session.expire(row)
    _carry_out(session, blueprint, loaded.state, new, commands, ctx)
    return commands


def _named(event: RolloutEvent) -> list[str]:
    """The devices an event names: the only records a step of it reads by id."""
    if isinstance(event, DevicesMatched):
        return [m.device_id for m in event.devices]
    if isinstance(event, DeviceReport):
        return [event.device_id]
    return []


def _carry_out(
    session: Session,
    blueprint: str,
    before: RolloutState,
    new: RolloutState,
    commands: Sequence[RolloutCommand],
    ctx: Context,
) -> None:
    moved = {c.device_id for c in commands if isinstance(c, AssignTarget | RevertDevice)}
    for c in commands:
        if isinstance(c, StateChanged):
            log.info(
                "rollout %s: %s -> %s (%s)", new.rollout_id, c.from_status, c.to_status, c.reason
            )
    if new.status is RolloutStatus.SUCCEEDED and before.status is not RolloutStatus.SUCCEEDED:
        bp_row = session.scalar(select(BlueprintRow).where(BlueprintRow.name == blueprint))
        if bp_row is not None:
            bp_row.stable_version = new.target_version
            if new.adapters is not None:
                bp_row.stable_adapters = new.adapters
    if moved:
        refresh_devices(
            session, ctx.store, poll_seconds=ctx.poll_seconds, device_ids=moved, targets=ctx.targets
        )


def run_event(
    session: Session, rollout_id: str, event: RolloutEvent, ctx: Context
) -> list[RolloutCommand]:
    """Step the stored rollout with ``event`` and commit, retrying on concurrent writers.

    The row is write-locked before it is read (a no-op UPDATE: a row lock on PostgreSQL, the
    write lock on SQLite): a canary wave's devices all report to the same rollout within a
    second, and optimistic retries alone ran out (20 conflicts in a row, a 500 to the device)
    when many request threads or API processes stepped it at once, on both engines. The lock
    makes them queue; the revision check stays as the guard. Device reports queue once per
    group instead (``record_reports``).
    """
    return run_events(session, rollout_id, [event], ctx)


def run_events(
    session: Session,
    rollout_id: str,
    events: Sequence[RolloutEvent],
    ctx: Context,
    *,
    first: Callable[[Session], None] | None = None,
) -> list[RolloutCommand]:
    """``run_event`` for several events in one transaction (``apply_events``); ``first``
    writes what the events rest on (the reports' device rows) in the same transaction, once
    the rollout row is locked, and again on a retry."""
    for _ in range(MAX_ATTEMPTS):
        session.execute(
            update(Rollout)
            .where(Rollout.id == rollout_id)
            .values(revision=Rollout.revision)
            .execution_options(synchronize_session=False)
        )
        row = session.get(Rollout, rollout_id, populate_existing=True)
        if row is None:
            raise LookupError(f"no rollout {rollout_id!r}")
        try:
            if first is not None:
                first(session)
            commands = apply_events(session, row, events, ctx)
            session.commit()
            return commands
        except RolloutConflict:
            session.rollback()
        except Exception:
            session.rollback()
            raise
    raise RuntimeError(f"rollout {rollout_id}: {MAX_ATTEMPTS} concurrent updates in a row")


# --- device side -----------------------------------------------------------------------------


def record_reports(
    session: Session, device_id: str, actions: Sequence[ActionStatus], ctx: Context
) -> None:
    """Feed a device's action statuses to the rollouts they name, in the order reported.

    With the app's ``Combiner`` (``ctx.reports``), a report is stepped in one transaction with
    the other reports queued for its rollout in this process (``server/combine.py``): the
    reports of a wave otherwise queue one by one on the rollout row's lock."""
    for status in actions:
        if not status.rollout_id:
            continue
        report = DeviceReport(
            device_id=device_id, state=status.state, failed_stage=status.stage, detail=status.detail
        )
        rollout_id = status.rollout_id
        try:
            if ctx.reports is None:
                run_event(session, rollout_id, report, ctx)
                continue

            def group(reports: Sequence[RolloutEvent], rollout_id: str = rollout_id) -> None:
                run_events(session, rollout_id, reports, ctx)

            def alone(report: RolloutEvent, rollout_id: str = rollout_id) -> None:
                run_event(session, rollout_id, report, ctx)

            ctx.reports.submit(rollout_id, report, group, alone)
        except LookupError:
            log.info("device %s reported for unknown rollout %s", device_id, rollout_id)


def note_running(device: Device, actions: Sequence[ActionStatus]) -> None:
    """Record on the device row the model an action report says it now runs (the caller
    commits), so the next rollout matches it by its latest news, not its last check-in.

    A device that reports ``active`` for the version it was told runs that version; one that
    reports ``rolled-back`` without a failed stage was told to revert and runs the version it
    names. A report that names no version the server told it (``desired``), or a rollback after
    a failure (it runs what it ran before, which the row already says), changes nothing. Only
    for ``/device/v1/actions``: a check-in's own ``active`` is newer than the reports it carries.
    """
    for status in actions:
        done = status.state is DeviceActionState.ACTIVE or (
            status.state is DeviceActionState.ROLLED_BACK and status.stage is None
        )
        want = (device.desired or {}).get("model") or {}
        if done and _note_adapter(device, want, status.version):
            continue
        if not done or want.get("version") != status.version:
            continue
        running = ActiveModel(
            name=want["name"],
            version=want["version"],
            variant=want["variant"],
            digest=want["manifest_digest"],
        ).model_dump(mode="json")
        before = device.active or {}
        if before.get("digest") == running["digest"]:  # the same model: its adapter stays
            running["adapter"] = before.get("adapter")
        if device.active != running:
            device.active = running


def _note_adapter(device: Device, want: dict[str, Any], reported: str) -> bool:
    """An adapter report (``adapter NAME:VERSION``, agent/adapters.py) naming the adapter the
    server told the device to load: it runs that adapter now (or none, after an unload of
    an adapter it was no longer told to run). False: not an adapter report."""
    if not reported.startswith("adapter "):
        return False
    active = dict(device.active or {})
    if not active or active.get("version") != want.get("version"):
        return True  # the model it runs is not the one told: its next check-in says more
    told = want.get("adapter") or None
    if told and reported == f"adapter {told['name']}:{told['version']}":
        running: dict[str, Any] | None = {
            "name": told["name"],
            "version": told["version"],
            "digest": told["digest"],
        }
    elif told is None:
        running = None  # unloaded, as told
    else:
        return True  # a report about another adapter (the one it left)
    if active.get("adapter") != running:
        device.active = active | {"adapter": running}
    return True


# --- time ------------------------------------------------------------------------------------


def tick_all(db: Database, store: BlobStore, *, poll_seconds: float) -> int:
    """One Tick to every unfinished rollout (soak, timeouts, scheduled starts); returns how many
    were ticked. A rollout whose tick fails is logged and skipped: it must not stop the others."""
    terminal = [s.value for s in RolloutStatus if s.is_terminal]
    ticked = 0
    with db.sessions() as session:
        ids = list(session.scalars(select(Rollout.id).where(Rollout.status.not_in(terminal))))
        for rollout_id in ids:
            try:
                run_event(session, rollout_id, Tick(), Context(store, poll_seconds))
            except Exception:  # run_event rolled the session back
                log.exception("rollout %s: tick failed", rollout_id)
                continue
            ticked += 1
    return ticked
