"""Rollouts on the control plane: the I/O around the pure machine in ``server/rollout``.

A rollout is created when a blueprint's resolved version changes (an apply, or a channel it
follows moving): ``reconcile`` matches the devices the blueprint governs and the new version can
be placed on, and starts the rollout unless its policy says ``start: manual``. From then on the
machine is fed events: device reports (from check-ins and ``/device/v1/actions``), late
enrollments (a matching device not yet in it), operator commands, and ticks from a background
thread (soak and timeouts). Its commands are carried out by recomputing the desired state of the
devices they name (``server/desired.py`` reads the stored rollout, so no device can be told two
things), and a rollout that succeeds makes its version the blueprint's stable version.

Writes are optimistic: ``run_event`` re-reads the row, steps, and updates ``WHERE revision =``
what it read; on a miss (another process stepped first) it rolls back and tries again. A restart
loses nothing: the state document is the whole memory of a rollout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from slmops.protocol.device import ActionStatus
from slmops.protocol.fleet import DeviceActionState
from slmops.server.blueprint import Blueprint, ModelRef
from slmops.server.blueprints_table import BlueprintRow
from slmops.server.db.models import Device, Rollout, utcnow
from slmops.server.db.session import Database
from slmops.server.desired import (
    Refresher,
    current_version,
    latest_rollout,
    refresh_devices,
    resolve_version,
    to_blueprint,
)
from slmops.server.registry.store import BlobStore
from slmops.server.rollout import (
    AssignTarget,
    DeviceReport,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RevertDevice,
    RolloutCommand,
    RolloutEvent,
    RolloutState,
    RolloutStatus,
    StateChanged,
    Tick,
    create_rollout,
    step,
)

log = logging.getLogger("slmops.server.rollouts")
MAX_ATTEMPTS = 20
UNKNOWN_CLASS = "unknown"
NO_EARLIER_VERSION = "nothing to revert to (no model before the rollout): keeps what it runs"


class RolloutConflict(Exception):
    """Another process stepped the rollout between our read and our write: read again."""


@dataclass
class Context:
    """What carrying out commands needs besides the session."""

    store: BlobStore
    poll_seconds: float
    now: float = field(default_factory=time.time)


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
    before = RolloutState.from_json(row.state_json)
    new, commands = _step_all(before, event, ctx.now)
    text = new.to_json()
    if text == row.state_json:
        return commands
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
    session.expire(row)
    _carry_out(session, row.blueprint, before, new, commands, ctx)
    return commands


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
    if moved:
        refresh_devices(session, ctx.store, poll_seconds=ctx.poll_seconds, device_ids=moved)


def run_event(
    session: Session, rollout_id: str, event: RolloutEvent, ctx: Context
) -> list[RolloutCommand]:
    """Step the stored rollout with ``event`` and commit, retrying on concurrent writers."""
    for _ in range(MAX_ATTEMPTS):
        row = session.get(Rollout, rollout_id, populate_existing=True)
        if row is None:
            raise LookupError(f"no rollout {rollout_id!r}")
        try:
            commands = apply_event(session, row, event, ctx)
            session.commit()
            return commands
        except RolloutConflict:
            session.rollback()
        except Exception:
            session.rollback()
            raise
    raise RuntimeError(f"rollout {rollout_id}: {MAX_ATTEMPTS} concurrent updates in a row")


# --- creation from blueprints ----------------------------------------------------------------


def matched_devices(refresher: Refresher, bp: Blueprint, version: str) -> list[Device]:
    """Devices ``bp`` governs on which ``version`` can be placed (the others keep what runs
    and are shown as unplaceable)."""
    out: list[Device] = []
    for device in refresher.session.scalars(select(Device).order_by(Device.device_id)):
        if refresher.governing(device) is not bp:
            continue
        if refresher.misfit(device, version, bp) is None:
            out.append(device)
    return out


def match_of(device: Device, model: str) -> MatchedDevice:
    return MatchedDevice(
        device_id=device.device_id,
        hardware_class=hardware_class(device),
        current_version=current_version(device, model),
    )


def reconcile(session: Session, bp_row: BlueprintRow, *, actor: str, ctx: Context) -> str | None:
    """Start a rollout when the blueprint's resolved version differs from what it rolls out.

    Returns the id of the rollout created, if any. An active rollout to another version is
    superseded: rolled back when the blueprint went back to its stable version, else aborted.
    Commits.
    """
    bp = to_blueprint(bp_row)
    name = bp.metadata.name
    try:
        version = resolve_version(session, bp.spec.model)
    except LookupError:
        return None  # devices get the reason as `unplaceable` from the refresh
    active = active_rollout(session, name)
    if active is not None:
        if (active.model, active.target_version) == (bp.spec.model.name, version):
            return None
        back = version == bp_row.stable_version and RolloutStatus(active.status) in (
            RolloutStatus.RUNNING,
            RolloutStatus.PAUSED,
        )
        command = OperatorCommand(
            action=OperatorAction.ROLLBACK if back else OperatorAction.ABORT,
            actor=actor,
            reason=f"blueprint {name} now wants version {version}",
        )
        run_event(session, active.id, command, ctx)
    session.refresh(bp_row)
    if version == bp_row.stable_version:
        return None
    refresher = Refresher(session, ctx.store, poll_seconds=ctx.poll_seconds)
    bp = next(b for b in refresher.blueprints if b.metadata.name == name)
    if isinstance(refresher.target(bp.spec.model.name, version), str):
        return None
    seq = (session.scalar(select(func.max(Rollout.seq)).where(Rollout.blueprint == name)) or 0) + 1
    rollout_id = f"{name}-{seq}"
    state = create_rollout(rollout_id, version, now=ctx.now, policy=bp.spec.rollout)
    session.add(
        Rollout(
            id=rollout_id,
            blueprint=name,
            model=bp.spec.model.name,
            target_version=version,
            state_json=state.to_json(),
            status=state.status.value,
            revision=0,
            seq=seq,
            created_at=utcnow(),
            updated_at=utcnow(),
        )
    )
    session.commit()
    devices = [match_of(d, bp.spec.model.name) for d in matched_devices(refresher, bp, version)]
    run_event(session, rollout_id, DevicesMatched(devices=devices), ctx)
    if bp.spec.rollout.start == "auto":
        start = OperatorCommand(
            action=OperatorAction.START, actor=actor, reason=f"blueprint {name} applied"
        )
        run_event(session, rollout_id, start, ctx)
    log.info("rollout %s created: %s -> %s", rollout_id, name, version)
    return rollout_id


def reconcile_following(
    session: Session, model: str, channel: str, *, actor: str, ctx: Context
) -> None:
    """A channel moved: reconcile every blueprint that follows it."""
    for row in list(session.scalars(select(BlueprintRow).order_by(BlueprintRow.name))):
        ref = ModelRef.model_validate(row.spec.get("model", {}))
        if ref.name == model and ref.channel == channel:
            reconcile(session, row, actor=actor, ctx=ctx)


def reconcile_pushed(session: Session, model: str, version: str, *, ctx: Context) -> list[str]:
    """A signed version just arrived: blueprints already asking for it (applied before the
    push, so no rollout could be created then) start their rollout now. A version some rollout
    of the blueprint already targeted is left alone: re-pushing must not retry a rolled-back
    rollout. Returns the rollouts created."""
    created = []
    for row in list(session.scalars(select(BlueprintRow).order_by(BlueprintRow.name))):
        ref = ModelRef.model_validate(row.spec.get("model", {}))
        if ref.name != model:
            continue
        try:
            wanted = resolve_version(session, ref)
        except LookupError:
            continue
        tried = session.scalar(
            select(Rollout.id).where(
                Rollout.blueprint == row.name, Rollout.target_version == wanted
            )
        )
        if wanted != version or tried is not None:
            continue
        rid = reconcile(session, row, actor=f"push of {model}:{version}", ctx=ctx)
        if rid:
            created.append(rid)
    if created:
        settle(session, ctx)
    return created


def stop_for_blueprint(session: Session, name: str, *, actor: str, ctx: Context) -> None:
    """The blueprint was deleted: abort its active rollout (moved devices keep what they run)."""
    active = active_rollout(session, name)
    if active is not None:
        command = OperatorCommand(
            action=OperatorAction.ABORT, actor=actor, reason=f"blueprint {name} deleted"
        )
        run_event(session, active.id, command, ctx)


# --- device side -----------------------------------------------------------------------------


def record_reports(
    session: Session, device_id: str, actions: Sequence[ActionStatus], ctx: Context
) -> None:
    """Feed a device's action statuses to the rollouts they name, in the order reported."""
    for status in actions:
        if not status.rollout_id:
            continue
        report = DeviceReport(
            device_id=device_id, state=status.state, failed_stage=status.stage, detail=status.detail
        )
        try:
            run_event(session, status.rollout_id, report, ctx)
        except LookupError:
            log.info("device %s reported for unknown rollout %s", device_id, status.rollout_id)


def join_if_matching(refresher: Refresher, device: Device, ctx: Context) -> None:
    """A device its blueprint's active rollout does not know yet (a late enrollment, or one
    whose labels changed) joins it, when the target can be placed on it."""
    session = refresher.session
    bp = refresher.governing(device)
    if bp is None:
        return
    active = active_rollout(session, bp.metadata.name)
    if active is None:
        return
    state = RolloutState.from_json(active.state_json)
    if device.device_id in state.devices:
        return
    if refresher.misfit(device, state.target_version, bp) is not None:
        return
    event = DevicesMatched(devices=[match_of(device, bp.spec.model.name)])
    run_event(session, active.id, event, ctx)


def settle(session: Session, ctx: Context) -> Counter[str]:
    """After a change that may re-govern devices (apply, delete, channel move): every active
    rollout takes the devices its blueprint now governs and it does not know yet, then every
    device's desired state is recomputed. Commits; counts devices per blueprint."""
    refresher = Refresher(session, ctx.store, poll_seconds=ctx.poll_seconds)
    terminal = [s.value for s in RolloutStatus if s.is_terminal]
    for row in list(session.scalars(select(Rollout).where(Rollout.status.not_in(terminal)))):
        bp = next((b for b in refresher.blueprints if b.metadata.name == row.blueprint), None)
        if bp is None:
            continue
        state = RolloutState.from_json(row.state_json)
        new = [
            match_of(d, bp.spec.model.name)
            for d in matched_devices(refresher, bp, state.target_version)
            if d.device_id not in state.devices
        ]
        if new:
            run_event(session, row.id, DevicesMatched(devices=new), ctx)
    counts = refresh_devices(session, ctx.store, poll_seconds=ctx.poll_seconds)
    session.commit()
    return counts


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


class Ticker:
    """A daemon thread that runs the periodic work every ``interval`` seconds until stopped:
    rollout ticks, telemetry (cohort figures for metric gates; drift checks and retention every
    ``drift_every`` seconds) and the feedback rules over new alerts.

    Every API process runs one; optimistic writes and unique keys make concurrent runs harmless.
    """

    def __init__(
        self,
        db: Database,
        store: BlobStore,
        *,
        poll_seconds: float,
        interval: float,
        drift_every: float = 600.0,
    ) -> None:
        self.db, self.store, self.poll_seconds, self.interval = db, store, poll_seconds, interval
        self.drift_every = drift_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def run_once(self) -> None:
        # imported here: telemetry and feedback import this module
        from slmops.server.feedback.engine import process_alerts
        from slmops.server.telemetry.ticks import telemetry_tick

        try:
            tick_all(self.db, self.store, poll_seconds=self.poll_seconds)
        except Exception:  # e.g. the database is unreachable: try again next time
            log.exception("rollout tick failed")
        telemetry_tick(
            self.db, self.store, poll_seconds=self.poll_seconds, slow_every=self.drift_every
        )
        try:
            with self.db.sessions() as session:
                process_alerts(session, Context(self.store, self.poll_seconds))
        except Exception:
            log.exception("feedback rules failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()
