"""The persisted rollout: one pydantic model holding everything the machine needs.

The whole state round-trips through JSON exactly, so a restart resumes the rollout from what was
stored with no other memory. It records each device's version before the rollout (what a
rollback reverts it to), which wave moved it, and what it last reported (``DeviceRecord``); each
wave's timings, latest gate evaluation and deciding evaluation; the history of status changes
with who made them; and a ``Tally`` of the device records, from which the machine decides.

The server stores the records as one row each and the rest (the summary, with the tally) on the
rollout row (``server/rollouts/store.py``); it hands ``step`` only the records an event names and
says so in ``loaded``, so a device report costs the same whatever the fleet's size. Tests and
the simulator keep every record in ``devices`` (``loaded`` None).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from slmops.protocol.fleet import DeviceActionState
from slmops.server.rollouts.machine.events import StateChanged
from slmops.server.rollouts.machine.gates import GateEvaluation, ReceivedFigure
from slmops.server.rollouts.machine.plan import wave_targets
from slmops.server.rollouts.machine.policy import RolloutPolicy
from slmops.server.rollouts.machine.status import RolloutModel, RolloutStatus

STATE_SCHEMA: Literal["slmops.rollout-state/v1"] = "slmops.rollout-state/v1"


class DeviceRecord(RolloutModel):
    """One matched device, from the rollout's point of view."""

    hardware_class: str
    from_version: str | None = Field(description="version before the rollout: the revert target")
    skipped: bool = Field(False, description="already on the target when matched: never moved")
    unplaceable: str | None = Field(
        None, description="why the target cannot be placed on it (not moved; counted by reason)"
    )
    wave: int | None = Field(None, description="the wave that assigned it; null: still queued")
    assigned_at: float | None = None
    reverted_at: float | None = Field(None, description="when it was told to revert")
    state: DeviceActionState | None = Field(None, description="last reported action state")
    failed_stage: DeviceActionState | None = None
    detail: str | None = None
    reported_at: float | None = None

    @property
    def status(self) -> str:
        """One word for tables: skipped, queued, or the last reported (or assumed) state."""
        if self.skipped:
            return "skipped"
        if self.unplaceable is not None and self.wave is None:
            return "unplaceable"
        if self.wave is None:
            return "queued"
        return (self.state or DeviceActionState.SCHEDULED).value

    @property
    def queued(self) -> bool:
        """Waiting for a wave: matched, placeable, not already on the target, not assigned."""
        return not self.skipped and self.unplaceable is None and self.wave is None

    @property
    def health_failed(self) -> bool:
        """Failed its health check: reported so, or rolled itself back without being told to."""
        if self.state is DeviceActionState.FAILED:
            return self.failed_stage is DeviceActionState.HEALTH_CHECKING
        return self.state is DeviceActionState.ROLLED_BACK and self.reverted_at is None


def reason_key(reason: str) -> str:
    """The bucket an unplaceable reason is counted under: numbers folded to ``N`` and cut at
    200 characters, so "needs 2.1 GB, has 1.9 GB" on a thousand devices is one counter, not a
    thousand (the summary must not grow with the fleet)."""
    return re.sub(r"\d+(?:\.\d+)?", "N", reason)[:200]


class WaveTally(RolloutModel):
    """Counts over the devices one wave assigned: what its gates judge."""

    devices: int = 0
    reported: int = 0
    succeeded: int = 0
    health_failures: int = 0
    model_config = RolloutModel.model_config | {"validate_assignment": False}  # hot counters


class Tally(RolloutModel):
    """Counts over every device record, kept in step with each record change.

    The machine decides from these (gates, wave targets, completion, rollback done) rather than
    by scanning the devices, so a device report costs the same at 10 devices and at 100,000.
    ``Tally.of(records)`` recomputes them from scratch; the property tests check that the
    incremental counts always equal it. Zero counters are dropped so both compare equal.
    """

    matched: int = 0
    skipped: int = 0
    queued: int = 0
    assigned: int = 0
    reverted: int = 0
    reverted_done: int = Field(0, description="reverted devices that report rolled-back")
    unplaceable: dict[str, int] = Field(default_factory=dict, description="per reason")
    statuses: dict[str, int] = Field(default_factory=dict, description="per DeviceRecord.status")
    classes: dict[str, int] = Field(default_factory=dict, description="assigned per class")
    waves: dict[str, WaveTally] = Field(default_factory=dict, description="per wave index")
    model_config = RolloutModel.model_config | {"validate_assignment": False}  # hot counters

    @property
    def total(self) -> int:
        """Devices the rollout moves: matched, placeable and not already on the target."""
        return self.queued + self.assigned

    @property
    def unplaceable_total(self) -> int:
        return sum(self.unplaceable.values())

    def wave(self, index: int) -> WaveTally:
        return self.waves.get(str(index)) or WaveTally()

    def count(self, d: DeviceRecord | None, sign: int) -> None:
        """Add (``sign`` 1) or remove (-1) one record's contribution."""
        if d is None:
            return
        self.matched += sign
        _bump(self.statuses, d.status, sign)
        if d.skipped:
            self.skipped += sign
        elif d.wave is None:
            if d.unplaceable is not None:
                _bump(self.unplaceable, reason_key(d.unplaceable), sign)
            else:
                self.queued += sign
        else:
            self.assigned += sign
            _bump(self.classes, d.hardware_class, sign)
            w = self.waves.setdefault(str(d.wave), WaveTally())
            w.devices += sign
            w.reported += sign if d.state is not None and d.state.is_final else 0
            w.succeeded += sign if d.state is DeviceActionState.ACTIVE else 0
            w.health_failures += sign if d.health_failed else 0
            if w == WaveTally():
                del self.waves[str(d.wave)]
            if d.reverted_at is not None:
                self.reverted += sign
                self.reverted_done += sign if d.state is DeviceActionState.ROLLED_BACK else 0

    @classmethod
    def of(cls, records: Iterable[DeviceRecord]) -> Tally:
        tally = cls()
        for d in records:
            tally.count(d, 1)
        return tally


def _bump(counts: dict[str, int], key: str, sign: int) -> None:
    value = counts.get(key, 0) + sign
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


class WaveOutcome(StrEnum):
    PASSED = "passed"
    PROMOTED = "promoted"
    SKIPPED = "skipped"  # no new devices: earlier waves already reached its target
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    ROLLED_BACK = "rolled-back"  # an operator rolled back during this wave
    ABORTED = "aborted"


class WaveRecord(RolloutModel):
    index: int
    started_at: float
    timer_from: float = Field(description="timeouts count from here: the start or last resume")
    ended_at: float | None = None
    outcome: WaveOutcome | None = None
    ended_by: str | None = Field(None, description="the operator who promoted or stopped it")
    evaluation: GateEvaluation | None = Field(None, description="latest gate evaluation")
    decision: GateEvaluation | None = Field(None, description="the evaluation that acted last")


class RolloutState(RolloutModel):
    schema_: Literal["slmops.rollout-state/v1"] = Field(STATE_SCHEMA, alias="schema")
    rollout_id: str = Field(min_length=1)
    target_version: str = Field(min_length=1)
    adapters: list[dict[str, Any]] | None = Field(
        None,
        description="the release's adapter assignments (blueprint `adapters:`, as JSON): moved "
        "devices get these, the others the blueprint's stable ones; null: a rollout of the "
        "version alone (made before adapters rolled out)",
    )
    seed: str = Field(description="orders devices into waves; fixed at creation")
    policy: RolloutPolicy
    status: RolloutStatus
    created_at: float
    start_at: float | None = None
    wave: int | None = Field(None, description="current wave index; null before the start")
    waves: list[WaveRecord] = Field(default_factory=list)
    devices: dict[str, DeviceRecord] = Field(default_factory=dict)
    figures: list[ReceivedFigure] = Field(default_factory=list)
    history: list[StateChanged] = Field(default_factory=list)
    tally: Tally = Field(default_factory=Tally, description="counts over every device record")
    loaded: frozenset[str] | None = Field(
        None,
        exclude=True,
        description="set by a store that keeps devices elsewhere: which device sets ``devices`` "
        "holds in full (queued, moved); null: ``devices`` is every device. Never persisted.",
    )
    model_config = RolloutModel.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _count_devices(self) -> Self:
        """A document without a tally (written before it existed) gets one from its devices."""
        if "tally" not in self.model_fields_set:  # (not via setattr: that would re-validate)
            object.__setattr__(self, "tally", Tally.of(self.devices.values()))
        return self

    @property
    def total(self) -> int:
        """Devices the rollout moves: matched, placeable and not already on the target."""
        return self.tally.total

    @property
    def assigned(self) -> list[str]:
        return [i for i, d in self.devices.items() if d.wave is not None]

    def targets(self) -> list[int]:
        """Cumulative device targets of every wave for the devices matched so far."""
        return wave_targets(self.policy.waves, self.tally.total)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RolloutState:
        return cls.model_validate_json(text)


def create_rollout(
    rollout_id: str,
    target_version: str,
    *,
    now: float,
    policy: RolloutPolicy | None = None,
    seed: str | None = None,
    start_at: float | None = None,
    adapters: list[dict[str, Any]] | None = None,
) -> RolloutState:
    """A new rollout: ``created`` (waits for a start command) or ``scheduled`` at ``start_at``.

    The seed defaults to the rollout id, so the same rollout always picks the same canaries.
    """
    return RolloutState(
        rollout_id=rollout_id,
        target_version=target_version,
        adapters=adapters,
        seed=rollout_id if seed is None else seed,
        policy=policy or RolloutPolicy(),
        status=RolloutStatus.CREATED if start_at is None else RolloutStatus.SCHEDULED,
        created_at=now,
        start_at=start_at,
    )
