"""A release is a version plus adapter assignments (issue 13): the pure parts.

Which devices a rollout skips (already on the release: same version *and* the adapter the
release gives them), which assignments a device gets under each plan (moved or skipped: the
rollout's; queued, reverted or outside: the stable ones), and that a stored release compares
equal exactly when it assigns the same adapters, whatever the order in the file.
"""

from __future__ import annotations

from slmops.server.blueprints.document import AdapterAssignment, adapter_release, parse_release
from slmops.server.device_plan import Plan, plan_for, release_adapters
from slmops.server.rollouts.machine import (
    DeviceRecord,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    create_rollout,
    step,
)
from slmops.server.rollouts.machine.policy import RolloutPolicy

S1 = {"selector": {"site": "s1"}, "adapter": "menu", "version": "2.0.0"}
S2 = {"selector": {"site": "s2"}, "adapter": "tools", "version": "1.0.0"}


def test_release_is_canonical_and_round_trips() -> None:
    a = [AdapterAssignment.model_validate(S1), AdapterAssignment.model_validate(S2)]
    assert adapter_release(a) == adapter_release(list(reversed(a)))
    assert parse_release(adapter_release(a)) == sorted(a, key=lambda x: x.adapter)
    assert parse_release(None) == []
    other = [AdapterAssignment.model_validate(S1 | {"version": "2.0.1"})]
    assert adapter_release(other) != adapter_release(a[:1])


def test_on_target_decides_skips_in_an_adapter_rollout() -> None:
    """Same version for everyone: only devices already on the release's adapter are skipped."""
    state = create_rollout("r", "1.0.0", now=0, policy=RolloutPolicy(), adapters=[S1])
    devices = [
        MatchedDevice(device_id="on", hardware_class="pi", current_version="1.0.0", on_target=True),
        MatchedDevice(
            device_id="off", hardware_class="pi", current_version="1.0.0", on_target=False
        ),
        MatchedDevice(device_id="legacy", hardware_class="pi", current_version="1.0.0"),
    ]
    new, _ = step(state, DevicesMatched(devices=devices), 1.0)
    assert new.devices["on"].skipped and new.devices["legacy"].skipped  # version comparison
    assert new.devices["off"].queued
    assert new.tally.total == 1
    _, commands = step(new, OperatorCommand(action=OperatorAction.START, actor="t"), 2.0)
    assert [c.device_id for c in commands if c.kind == "assign-target"] == ["off"]


def test_each_plan_gets_its_assignments() -> None:
    rollout = create_rollout("r", "1.0.0", now=0, adapters=[S1])
    stable = [AdapterAssignment.model_validate(S2)]
    target = parse_release([S1])
    moved = DeviceRecord(hardware_class="pi", from_version="1.0.0", wave=0, assigned_at=1)
    reverted = moved.model_copy(update={"reverted_at": 2.0})
    queued = DeviceRecord(hardware_class="pi", from_version="1.0.0")
    skipped = DeviceRecord(hardware_class="pi", from_version="1.0.0", skipped=True)
    cases = {
        "moved": (moved, target),
        "skipped": (skipped, target),
        "reverted": (reverted, stable),
        "queued": (queued, stable),
    }
    for name, (record, want) in cases.items():
        plan = plan_for("1.0.0", rollout, record, "1.0.0")
        assert release_adapters(plan, rollout, stable) == want, name
    assert release_adapters(plan_for("1.0.0", None, None, "1.0.0"), None, stable) == stable
    # a rollout of the version alone (made before adapters rolled out) changes no adapter
    legacy = create_rollout("r", "1.1.0", now=0)
    assert release_adapters(Plan("1.1.0", "r", release=True), legacy, stable) == stable
