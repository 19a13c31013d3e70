"""The counts the machine decides from, and stepping with only the records an event names.

The server keeps one row per device and hands ``step`` a state holding only the records the
event names (``RolloutState.loaded``); the machine asks for every queued or moved record
(``NeedDevices``) only when it fills a wave or rolls back. These tests hold that to the
complete state:

- after every step the incremental tally equals one recomputed from all records, and every
  matched device is counted once (moved, queued, skipped or unplaceable);
- stepping the partial state gives the same status, waves, tally and commands as stepping the
  complete one, and every record the complete step changed is among the partial step's records.

Also ``desired.plan_for``: only an assignment (or its revert) hands a device a version it does
not run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import event as observe
from hypothesis import strategies as st

from slmops.protocol.fleet import DeviceActionState as A
from slmops.server.device_plan import plan_for
from slmops.server.rollouts.machine import (
    DeviceRecord,
    DeviceReport,
    DevicesMatched,
    InvalidTransition,
    MatchedDevice,
    NeedDevices,
    OperatorAction,
    OperatorCommand,
    RolloutCommand,
    RolloutEvent,
    RolloutPolicy,
    RolloutState,
    Tally,
    Tick,
    create_rollout,
    step,
)

POOL = [f"d{i:02}" for i in range(12)]
TARGET = "v2"
POLICY = RolloutPolicy.from_data(
    {
        "waves": [{"count": 1}, {"percent": 50}, {"percent": 100}],
        "gates": {"min_soak_seconds": 10, "timeout_seconds": 500, "min_reported": 0.5},
    }
)

matched = st.builds(
    MatchedDevice,
    device_id=st.sampled_from(POOL),
    hardware_class=st.sampled_from(["pi5", "jetson"]),
    current_version=st.sampled_from([None, "v1", "v1", TARGET]),
    unplaceable=st.sampled_from([None, None, None, "needs 2 GB RAM, has 1 GB", "no runtime"]),
)
report = st.builds(
    DeviceReport,
    device_id=st.sampled_from(POOL),
    state=st.sampled_from([*A, A.ACTIVE, A.ACTIVE]),
    failed_stage=st.sampled_from([None, None, A.HEALTH_CHECKING, A.DOWNLOADING]),
)
events: st.SearchStrategy[RolloutEvent] = st.one_of(
    st.builds(DevicesMatched, devices=st.lists(matched, min_size=1, max_size=5)),
    report,
    report,
    report,
    st.builds(Tick),
    st.builds(Tick),
    st.builds(OperatorCommand, action=st.sampled_from(list(OperatorAction)), actor=st.just("op")),
)


def partial_step(
    full: RolloutState, event: RolloutEvent, now: float
) -> tuple[RolloutState, list[RolloutCommand]]:
    """Step as the server does: the event's records first, more sets only on request."""
    named: list[str] = []
    if isinstance(event, DevicesMatched):
        named = [m.device_id for m in event.devices]
    elif isinstance(event, DeviceReport):
        named = [event.device_id]
    records = {i: full.devices[i] for i in named if i in full.devices}
    state = full.model_copy(update={"devices": records, "loaded": frozenset()})
    for _ in range(3):
        try:
            return step(state, event, now)
        except NeedDevices as need:
            more = dict(state.devices)
            for i, d in full.devices.items():
                wanted = (
                    d.queued
                    if need.kind == "queued"
                    else (d.wave is not None and d.reverted_at is None)
                )
                if wanted:
                    more.setdefault(i, d)
            loaded = (state.loaded or frozenset()) | {need.kind}
            state = state.model_copy(update={"devices": more, "loaded": loaded})
    raise AssertionError("the machine kept asking for devices")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.lists(matched, min_size=1, max_size=12),
    evs=st.lists(events, min_size=1, max_size=40),
    gaps=st.lists(st.floats(0, 200), max_size=40),
)
def test_counts_follow_every_step_and_partial_steps_agree(
    first: list[MatchedDevice], evs: list[RolloutEvent], gaps: list[float]
) -> None:
    state = create_rollout("r", TARGET, now=0.0, policy=POLICY)
    start = OperatorCommand(action=OperatorAction.START, actor="op")
    evs = [DevicesMatched(devices=first), start, *evs]
    now = 0.0
    for i, event in enumerate(evs):
        now += gaps[i] if i < len(gaps) else 1.0
        try:
            new, commands = step(state, event, now)
        except InvalidTransition:
            continue
        assert new.tally == Tally.of(new.devices.values()), event
        t = new.tally
        assert t.matched == len(new.devices) == sum(t.statuses.values())
        assert t.matched == t.assigned + t.queued + t.skipped + t.unplaceable_total
        got, got_commands = partial_step(state, event, now)
        assert got_commands == commands, event
        assert got.tally == new.tally
        assert (got.status, got.wave, got.waves, got.history) == (
            new.status,
            new.wave,
            new.waves,
            new.history,
        )
        changed = {k for k, d in new.devices.items() if state.devices.get(k) is not d}
        assert changed <= set(got.devices), (changed, set(got.devices))
        for k, d in got.devices.items():
            assert d == new.devices[k]
        state = new
    observe(f"ended {state.status.value}, {state.tally.assigned} moved")
    restored = RolloutState.from_json(state.to_json())
    assert restored.tally == state.tally


def test_a_rollout_of_unplaceable_devices_pauses_and_says_why() -> None:
    state = create_rollout("r", TARGET, now=0.0, policy=POLICY)
    devices = [
        MatchedDevice(
            device_id=f"x{i}",
            hardware_class="pi5",
            current_version="v1",
            unplaceable=f"needs {i + 2} GB RAM, has 1 GB",
        )
        for i in range(5)
    ] + [MatchedDevice(device_id="y", hardware_class="pi5", current_version=TARGET)]
    state, _ = step(state, DevicesMatched(devices=devices), 0.0)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="op"), 1.0)
    assert state.status.value == "paused"
    reason = state.history[-1].reason
    assert "nothing can move" in reason
    assert "6 matched" in reason and "1 already run v2" in reason
    assert "5 unplaceable (5: needs N GB RAM, has N GB)" in reason
    assert state.tally.unplaceable == {"needs N GB RAM, has N GB": 5}
    # one becomes placeable: the rollout that paused itself starts, and moves it in wave 0
    fits = MatchedDevice(device_id="x0", hardware_class="pi5", current_version="v1")
    state, commands = step(state, DevicesMatched(devices=[fits]), 2.0)
    assert state.status.value == "running" and state.wave == 0
    assert "devices became placeable" in state.history[-1].reason
    assert [c.kind for c in commands if c.kind == "assign-target"] == ["assign-target"]


def test_only_assignments_move_a_device() -> None:
    state = create_rollout("r", TARGET, now=0.0)
    skipped = DeviceRecord(hardware_class="pi5", from_version=TARGET, skipped=True)
    queued = DeviceRecord(hardware_class="pi5", from_version="v1")
    moved = DeviceRecord(hardware_class="pi5", from_version="v1", wave=0, assigned_at=1.0)
    reverted = moved.model_copy(update={"reverted_at": 2.0})
    unplaceable = DeviceRecord(hardware_class="pi5", from_version="v1", unplaceable="too big")
    # assignments and reverts: the rollout's word, whatever the device runs
    assert plan_for("v0", state, moved, "v1") == plan_for("v0", state, moved, None)
    assert plan_for("v0", state, moved, "v1").version == TARGET
    assert plan_for("v0", state, moved, "v1").rollout_id == "r"
    back = plan_for("v0", state, reverted, TARGET)
    assert (back.version, back.rollout_id, back.revert) == ("v1", "r", True)
    # skipped but (by its last report) not on the target: keeps what it runs
    assert plan_for("v0", state, skipped, "v1").version is None
    assert plan_for("v0", state, skipped, TARGET).version == TARGET
    # queued: the version it had, only while it still runs it
    assert plan_for("v0", state, queued, "v1").version == "v1"
    assert plan_for("v0", state, queued, "v3").version is None
    # outside the rollout (never matched, or unplaceable): stable only as a first install
    for record in (None, unplaceable):
        assert plan_for("v0", state, record, None).version == "v0"
        assert plan_for("v0", state, record, "v1").version is None
        assert plan_for("v0", state, record, "v0").version == "v0"
    assert plan_for("v0", None, None, "v1").version is None
    assert plan_for("v0", None, None, None).version == "v0"
