"""Adapter rollouts in the rollout machine (``step``), fed the report sequences agents send:
a rollout that paused itself because nothing could be placed (the release's adapter not pushed
yet) starts once devices become placeable, and a reverted device whose adapter step fails after
it reported its revert does not hold the rollback open. (The agent no longer reports a new
model's ``active`` for the rollout while an adapter step follows: tests/agent/
test_adapter_reports.py.)
"""

from __future__ import annotations

from slmops.protocol.fleet import DeviceActionState as S
from slmops.server.rollouts.machine import (
    DeviceReport,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutState,
    RolloutStatus,
    create_rollout,
    step,
)
from slmops.server.rollouts.machine.policy import RolloutPolicy

RELEASE = [{"selector": {}, "adapter": "menu", "version": "2.0.0"}]
ADAPTER = "adapter menu:2.0.0"


def _policy(waves: list[dict[str, object]], soak: float = 0.0) -> RolloutPolicy:
    gates = {"min_soak_seconds": soak, "timeout_seconds": soak + 600, "min_reported": 1.0}
    return RolloutPolicy.from_data({"waves": waves, "gates": gates})


def _started(ids: list[str], waves: list[dict[str, object]], version: str = "2.0") -> RolloutState:
    state = create_rollout("r", version, now=0, policy=_policy(waves), adapters=RELEASE)
    matched = [
        MatchedDevice(device_id=d, hardware_class="pi", current_version="1.0", on_target=False)
        for d in ids
    ]
    state, _ = step(state, DevicesMatched(devices=matched), 1.0)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), 2.0)
    assert state.status is RolloutStatus.RUNNING
    return state


def _report(state: RolloutState, device: str, st: S, at: float, **kw: object) -> RolloutState:
    new, _ = step(state, DeviceReport(device_id=device, state=st, **kw), at)  # type: ignore[arg-type]
    return new


def test_paused_all_unplaceable_rollout_moves_once_the_adapter_arrives() -> None:
    state = create_rollout("r", "1.0", now=0, policy=_policy([{"percent": 100}]), adapters=RELEASE)
    why = "adapter menu:2.0.0 is not in the registry (push it with `slmops push`)"
    devices = ["d1", "d2"]
    unplaced = [
        MatchedDevice(device_id=d, hardware_class="pi", current_version="1.0", unplaceable=why)
        for d in devices
    ]
    state, _ = step(state, DevicesMatched(devices=unplaced), 1.0)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), 2.0)
    assert state.status is RolloutStatus.PAUSED  # "nothing can move"
    # the adapter's signature arrives: reconcile_adapter -> settle re-sights them, placeable
    placed = [
        MatchedDevice(device_id=d, hardware_class="pi", current_version="1.0", on_target=False)
        for d in devices
    ]
    state, commands = step(state, DevicesMatched(devices=placed), 3.0)
    assert state.tally.queued == 2 or state.tally.assigned == 2
    assert [c for c in commands if c.kind == "assign-target"], (state.status, commands)


def test_rollback_completes_when_a_reverted_device_reports_an_adapter_failure() -> None:
    state = _started(["d1", "d2"], [{"percent": 100}])
    state = _report(state, "d1", S.ACTIVE, 3.0)  # model 2.0
    state = _report(state, "d1", S.ACTIVE, 4.0)  # adapter 2.0.0 (same rollout id)
    state = _report(state, "d2", S.FAILED, 5.0, failed_stage=S.HEALTH_CHECKING)
    assert state.status is RolloutStatus.ROLLING_BACK
    state = _report(state, "d1", S.ROLLED_BACK, 6.0)  # model 1.0 from the kept slot
    # d1's stable adapter is not in its kept adapter slot: downloaded, and the download fails
    state = _report(state, "d1", S.DOWNLOADING, 7.0)
    state = _report(state, "d1", S.FAILED, 8.0, failed_stage=S.DOWNLOADING)
    state = _report(state, "d2", S.ROLLED_BACK, 9.0)  # told back to 1.0: kept slot
    # every moved device reported its revert; the rollout must not wait for ever
    assert state.status is RolloutStatus.ROLLED_BACK, state.status
