"""Rollouts on the control plane: the I/O around the pure machine in ``server/rollout``.

A rollout is created when a blueprint's release changes: its resolved version (an apply, or a
channel it follows moving) or its adapter assignments (the release's ``adapters``, made stable
with the version when the rollout succeeds): ``reconcile`` matches the devices the blueprint governs (those the new version
cannot be placed on as unplaceable, with the reason), and starts the rollout unless its policy
says ``start: manual``. From then on the
machine is fed events: device reports (from check-ins and ``/device/v1/actions``), late
enrollments (a matching device not yet in it), operator commands, and ticks from the ticker
(``server/ticker.py``: soak and timeouts). Its commands are carried out by recomputing the desired state of the
devices they name (``server/desired.py`` reads the stored rollout, so no device can be told two
things), and a rollout that succeeds makes its version the blueprint's stable version.

Storage (``server/rollout_rows.py``): a small summary on the rollout row and one row per
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
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from slmops.protocol.device import ActionStatus, ActiveModel
from slmops.protocol.fleet import DeviceActionState
from slmops.server import rollout_rows as rows
from slmops.server.blueprint import Blueprint, ModelRef, adapter_release, parse_release
from slmops.server.blueprints_table import BlueprintRow
from slmops.server.context import Context
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
    NeedDevices,
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
from slmops.server.rollout_rows import RolloutConflict

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
    loaded = rows.load(session, row, _named(event))
    for _ in range(3):  # at most: queued, then moved
        try:
            new, commands = _step_all(loaded.state, event, ctx.now)
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
    makes them queue; the revision check stays as the guard.
    """
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


def matched_devices(
    refresher: Refresher, bp: Blueprint, version: str, adapters: list[dict[str, Any]] | None
) -> list[tuple[Device, str | None]]:
    """Every device ``bp`` governs, with why ``version`` cannot be placed on it (None: it can).
    The rollout records the unplaceable ones too (they keep what they run), so it accounts for
    every device it matched. A revoked device is not matched: it cannot check in, so it would
    hold its wave open (``identity.revoke`` takes it out of the rollouts it was in)."""
    out: list[tuple[Device, str | None]] = []
    for device in refresher.session.scalars(select(Device).order_by(Device.device_id)):
        if device.status == REVOKED:
            continue
        if refresher.governing(device) is bp:
            out.append((device, refresher.misfit(device, version, bp, adapters)))
    return out


def match_of(
    device: Device, model: str, unplaceable: str | None = None, on_target: bool | None = None
) -> MatchedDevice:
    return MatchedDevice(
        device_id=device.device_id,
        hardware_class=hardware_class(device),
        current_version=current_version(device, model),
        unplaceable=unplaceable,
        on_target=on_target,
    )


def sighting(
    refresher: Refresher, device: Device, bp: Blueprint, state: RolloutState, why: str | None
) -> MatchedDevice:
    """What a rollout learns of a matched device: its class, version, whether the release can
    be placed on it and whether it runs the release already (version and adapter)."""
    on = refresher.on_release(device, bp, state.target_version, state.adapters)
    return match_of(device, bp.spec.model.name, why, on)


def release_of(bp: Blueprint) -> list[dict[str, Any]]:
    return adapter_release(bp.spec.adapters)


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
    adapters = release_of(bp)
    stable = adapter_release(parse_release(bp_row.stable_adapters))
    active = active_rollout(session, name)
    if active is not None:
        running = RolloutState.from_json(active.state_json)
        same = (active.model, active.target_version) == (bp.spec.model.name, version)
        if same and running.adapters in (None, adapters):
            return None
        back = (version, adapters) == (bp_row.stable_version, stable) and RolloutStatus(
            active.status
        ) in (RolloutStatus.RUNNING, RolloutStatus.PAUSED)
        wants = f"version {version}" + (f" with adapters {_names(adapters)}" if adapters else "")
        command = OperatorCommand(
            action=OperatorAction.ROLLBACK if back else OperatorAction.ABORT,
            actor=actor,
            reason=f"blueprint {name} now wants {wants}",
        )
        run_event(session, active.id, command, ctx)
    session.refresh(bp_row)
    stable = adapter_release(parse_release(bp_row.stable_adapters))
    if (version, adapters) == (bp_row.stable_version, stable):
        return None
    refresher = Refresher(session, ctx.store, poll_seconds=ctx.poll_seconds, targets=ctx.targets)
    bp = next(b for b in refresher.blueprints if b.metadata.name == name)
    if isinstance(refresher.target(bp.spec.model.name, version), str):
        return None
    seq = (session.scalar(select(func.max(Rollout.seq)).where(Rollout.blueprint == name)) or 0) + 1
    rollout_id = f"{name}-{seq}"
    state = create_rollout(
        rollout_id, version, now=ctx.now, policy=bp.spec.rollout, adapters=adapters
    )
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
    matched = matched_devices(refresher, bp, version, adapters)
    devices = [sighting(refresher, d, bp, state, why) for d, why in matched]
    run_event(session, rollout_id, DevicesMatched(devices=devices), ctx)
    if bp.spec.rollout.start == "auto":
        start = OperatorCommand(
            action=OperatorAction.START, actor=actor, reason=f"blueprint {name} applied"
        )
        run_event(session, rollout_id, start, ctx)
    log.info("rollout %s created: %s -> %s %s", rollout_id, name, version, _names(adapters))
    return rollout_id


def _names(adapters: list[dict[str, Any]]) -> str:
    return ", ".join(f"{a['adapter']}:{a['version']}" for a in adapters) or "(none)"


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


def reconcile_adapter(session: Session, name: str, *, ctx: Context) -> list[str]:
    """An adapter's signature just arrived: the devices a rollout could not place for want of
    it are matched again (``settle``: now queued), devices whose stable release names it get
    it (it may have been missing), and a blueprint's release that names it is reconciled.
    Returns the rollouts created."""
    created, named = [], False
    for row in list(session.scalars(select(BlueprintRow).order_by(BlueprintRow.name))):
        releases = [row.spec.get("adapters") or [], row.stable_adapters or []]
        if not any(isinstance(a, dict) and a.get("adapter") == name for r in releases for a in r):
            continue
        named = True
        rid = reconcile(session, row, actor=f"push of adapter {name}", ctx=ctx)
        if rid:
            created.append(rid)
    if named:
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


def join_if_matching(refresher: Refresher, device: Device, ctx: Context) -> None:
    """A device its blueprint's active rollout does not know yet (a late enrollment, or one
    whose labels changed) joins it: queued when the target can be placed on it, else as
    unplaceable with the reason. An unplaceable one is looked at again (its inventory may have
    changed). One primary-key read when the rollout knows the device already."""
    session = refresher.session
    bp = refresher.governing(device)
    if bp is None:
        return
    active = active_rollout(session, bp.metadata.name)
    if active is None:
        return
    summary = RolloutState.from_json(active.state_json)  # small: the devices are rows
    if summary.devices:  # a document written before rows existed
        known = summary.devices.get(device.device_id)
    else:
        known = rows.device_record(session, active.id, device.device_id)
    if known is not None and known.status != "unplaceable":
        return
    why = refresher.misfit(device, summary.target_version, bp, summary.adapters)
    if known is not None and known.unplaceable == why:
        return
    event = DevicesMatched(devices=[sighting(refresher, device, bp, summary, why)])
    run_event(session, active.id, event, ctx)


def settle(session: Session, ctx: Context, *, batch: int = SETTLE_BATCH) -> Counter[str]:
    """After a change that may re-govern devices (apply, delete, channel move): every active
    rollout takes the devices its blueprint now governs and it does not know yet, then every
    device's desired state is recomputed. Commits; counts devices per blueprint.

    The recompute goes ``batch`` devices at a time in device id order (keyset pagination),
    committing after each: at 100k devices one transaction would hold every device row's lock
    (SQLite's write lock) for the whole recompute. Each batch reads its own snapshot and
    writes conditionally (``desired.refresh_devices``, ``server/desired_store.py``), so a
    wave change committed meanwhile is never overwritten by this older recompute. Taking the
    active rollouts' row locks for the settle instead would not cover a rollout created in
    another process after the locks were taken, and would stall every device report."""
    refresher = Refresher(session, ctx.store, poll_seconds=ctx.poll_seconds, targets=ctx.targets)
    terminal = [s.value for s in RolloutStatus if s.is_terminal]
    for row in list(session.scalars(select(Rollout).where(Rollout.status.not_in(terminal)))):
        bp = next((b for b in refresher.blueprints if b.metadata.name == row.blueprint), None)
        if bp is None:
            continue
        known = rows.known_ids(session, row)
        unplaced = rows.known_ids(session, row, "unplaceable")  # may fit now: look again
        summary = RolloutState.from_json(row.state_json)
        new = [
            sighting(refresher, d, bp, summary, why)
            for d, why in matched_devices(refresher, bp, summary.target_version, summary.adapters)
            if d.device_id not in known or d.device_id in unplaced
        ]
        if new:
            run_event(session, row.id, DevicesMatched(devices=new), ctx)
    session.commit()
    counts: Counter[str] = Counter()
    after: str | None = None
    while True:
        query = select(Device.device_id).order_by(Device.device_id).limit(batch)
        if after is not None:
            query = query.where(Device.device_id > after)
        ids = list(session.scalars(query))
        if not ids:
            return counts
        counts.update(
            refresh_devices(
                session,
                ctx.store,
                poll_seconds=ctx.poll_seconds,
                device_ids=set(ids),
                targets=ctx.targets,
            )
        )
        session.commit()
        after = ids[-1]


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
