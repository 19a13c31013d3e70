"""What a blueprint's latest rollout means for one device: the version it should run (``Plan``)
and which adapter assignments hold for it. Pure (no database): ``desired.py`` feeds it the
stored rollout and the device's record, and the property tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmops.server.blueprints.document import AdapterAssignment, parse_release
from slmops.server.rollouts.machine import DeviceRecord, RolloutState


@dataclass(frozen=True)
class Plan:
    """The version a device should run under its blueprint, and the rollout that says so."""

    version: str | None  # None: keep what runs
    rollout_id: str | None = None
    revert: bool = False
    known: bool = False  # the rollout has this device (moved, queued or skipped)
    release: bool = False  # the rollout's adapters (moved or skipped), else the stable ones


def plan_for(
    stable: str | None,
    rollout: RolloutState | None,
    record: DeviceRecord | None,
    current: str | None,
) -> Plan:
    """What the blueprint's latest rollout (or else its stable version) means for one device
    (``record``: its record in that rollout; ``current``: the version of the model it runs).

    Moved devices get the target, reverted ones the version they had before (``revert``): the
    only answers that change a device's version. Queued ones keep what they ran when matched
    (``from_version``; None: no model), skipped ones (already on the target) the target, and a
    device the rollout never matched or cannot place the stable version; each of these only when
    it is what the device runs (or it runs no version yet: a first install), else it keeps what
    it runs. So a device whose check-in lags behind its last install is never moved outside a
    rollout's waves and gates.
    """
    if rollout is not None and record is not None:
        rid = rollout.rollout_id
        if record.reverted_at is not None:
            return Plan(record.from_version, rid, revert=True, known=True)
        if record.wave is not None:
            return Plan(rollout.target_version, rid, known=True, release=True)
    plan: Plan
    if rollout is None or record is None or record.unplaceable is not None:
        plan = Plan(stable)
    elif record.skipped:
        plan = Plan(rollout.target_version, known=True, release=True)
    else:
        plan = Plan(record.from_version, known=True)
    if plan.version is not None and current is not None and plan.version != current:
        return Plan(None, known=plan.known)  # not an assignment: never another version
    return plan


def release_adapters(
    plan: Plan, rollout: RolloutState | None, stable: list[AdapterAssignment]
) -> list[AdapterAssignment]:
    """The adapter assignments that hold for a device under ``plan``: the rollout's release for
    a device it moved (or skipped: already there), the blueprint's stable ones otherwise (a
    reverted device included: what it ran before). A rollout of the version alone (no
    ``adapters`` recorded) changes no adapter."""
    if plan.release and rollout is not None and rollout.adapters is not None:
        return parse_release(rollout.adapters)
    return stable
