"""Rollouts from blueprints: matching the devices a blueprint governs, creating a rollout when
its release changes, and settling devices after a change that may re-govern them.

A blueprint's release is its resolved version (a pin, or a channel it follows) and its adapter
assignments. ``reconcile`` compares it with the blueprint's stable release and the active
rollout's: a new release supersedes the active rollout (rolled back when the blueprint went back
to its stable release, else aborted) and starts a rollout that matches every device the
blueprint governs, each one as placeable (queued, or skipped when it already runs the release:
``sighting``) or unplaceable with the reason. ``settle`` and ``join_if_matching`` bring devices
the blueprint came to govern later (an apply elsewhere, a late enrollment, a label change) into
the active rollout. Stepping a rollout with these events is ``server/rollouts/service.py``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from slmops.server.blueprints.document import Blueprint, ModelRef, adapter_release, parse_release
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.models import Device, merged_labels, utcnow
from slmops.server.desired import Refresher, current_version, governing, refresh_devices
from slmops.server.rollouts import store as rows
from slmops.server.rollouts.machine import (
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutState,
    RolloutStatus,
    create_rollout,
)
from slmops.server.rollouts.service import (
    REVOKED,
    SETTLE_BATCH,
    active_rollout,
    hardware_class,
    run_event,
)
from slmops.server.rollouts.tables import Rollout
from slmops.server.targets import resolve_version, to_blueprint

log = logging.getLogger("slmops.server.rollouts")


def governed_ids(refresher: Refresher, bp: Blueprint) -> list[str]:
    """The ids of every device ``bp`` governs but revoked ones (they cannot check in, so they
    would hold a wave open: ``identity.revoke`` takes them out of the rollouts they were in),
    in id order. Reads four columns, not whole rows: at 100,000 devices the rows' inventory
    and desired state made this a fifth of a settle."""
    columns = select(Device.device_id, Device.status, Device.labels, Device.operator_labels)
    return [
        device_id
        for device_id, status, labels, operator_labels in refresher.session.execute(
            columns.order_by(Device.device_id)
        )
        if status != REVOKED
        and governing(refresher.blueprints, merged_labels(labels, operator_labels)) is bp
    ]


def devices_by_id(session: Session, ids: list[str], chunk: int = 1000) -> list[Device]:
    """The rows of ``ids``, in that order (a chunk of ids per query)."""
    found: dict[str, Device] = {}
    for at in range(0, len(ids), chunk):
        part = ids[at : at + chunk]
        found.update(
            (d.device_id, d)
            for d in session.scalars(select(Device).where(Device.device_id.in_(part)))
        )
    return [found[i] for i in ids if i in found]


def governed_devices(refresher: Refresher, bp: Blueprint) -> list[Device]:
    """Every device ``bp`` governs (``governed_ids``), as rows."""
    return devices_by_id(refresher.session, governed_ids(refresher, bp))


def matched_devices(
    refresher: Refresher, bp: Blueprint, version: str, adapters: list[dict[str, Any]] | None
) -> list[tuple[Device, str | None]]:
    """Every device ``bp`` governs (``governed_devices``), with why the release cannot be placed
    on it (None: it can). The rollout records the unplaceable ones too (they keep what they
    run), so it accounts for every device it matched."""
    return [
        (device, refresher.misfit(device, version, bp, adapters))
        for device in governed_devices(refresher, bp)
    ]


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


def reconcile_adapter(session: Session, name: str, *, ctx: Context) -> bool:
    """An adapter's signature just arrived: the devices a rollout could not place for want of
    it are matched again (``settle``: now queued; a rollout that paused because nothing could
    move starts), and devices whose stable release names it get it (it may have been missing).

    No rollout is created here: a missing adapter never holds a rollout back (it only makes
    devices unplaceable), so a blueprint whose release has no active rollout has ended it
    (succeeded, aborted or rolled back), and a push must not retry a release that ended, as
    ``reconcile_pushed`` does not for versions. Returns whether any blueprint names it."""
    found = list(session.scalars(select(BlueprintRow).order_by(BlueprintRow.name)))
    named = any(
        isinstance(a, dict) and a.get("adapter") == name
        for row in found
        for r in (row.spec.get("adapters") or [], row.stable_adapters or [])
        for a in r
    )
    if named:
        settle(session, ctx)
    return named


def stop_for_blueprint(session: Session, name: str, *, actor: str, ctx: Context) -> None:
    """The blueprint was deleted: abort its active rollout (moved devices keep what they run)."""
    active = active_rollout(session, name)
    if active is not None:
        command = OperatorCommand(
            action=OperatorAction.ABORT, actor=actor, reason=f"blueprint {name} deleted"
        )
        run_event(session, active.id, command, ctx)


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
        version, adapters = summary.target_version, summary.adapters
        wanted = [i for i in governed_ids(refresher, bp) if i not in known or i in unplaced]
        new = [
            sighting(refresher, d, bp, summary, refresher.misfit(d, version, bp, adapters))
            for d in devices_by_id(session, wanted)
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
