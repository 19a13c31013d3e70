"""A running rollout over many devices, built in-process: the report-cost test and
bench/rollout_reports.py time the same thing (bench loads this file by path). Imports only
slmops, so a benchmark can load it without the test tree on its path."""

from __future__ import annotations

from slmops.protocol.fleet import DeviceActionState
from slmops.server.context import Context
from slmops.server.db.models import utcnow
from slmops.server.db.session import Database
from slmops.server.rollouts.machine import (
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutPolicy,
    create_rollout,
)
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import load_full
from slmops.server.rollouts.tables import Rollout

SLOW = RolloutPolicy.from_data({"gates": {"min_soak_seconds": 1e6, "timeout_seconds": 2e6}})
STAGES = [DeviceActionState.DOWNLOADING, DeviceActionState.VERIFYING, DeviceActionState.INSTALLING]


def started_rollout(db: Database, ctx: Context, rollout_id: str, n: int) -> list[str]:
    """A running rollout over ``n`` devices; returns the devices its first wave assigned."""
    state = create_rollout(rollout_id, "2.0", now=ctx.now, policy=SLOW)
    with db.sessions() as session:
        session.add(
            Rollout(
                id=rollout_id,
                blueprint=rollout_id,
                model="m",
                target_version="2.0",
                state_json=state.to_json(),
                status=state.status.value,
                revision=0,
                seq=1,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
        session.commit()
        devices = [
            MatchedDevice(
                device_id=f"{rollout_id}-{i:06}",
                hardware_class=("pi5", "jetson", "nuc")[i % 3],
                current_version="1.0",
            )
            for i in range(n)
        ]
        run_event(session, rollout_id, DevicesMatched(devices=devices), ctx)
        start = OperatorCommand(action=OperatorAction.START, actor="test")
        run_event(session, rollout_id, start, ctx)
        row = session.get(Rollout, rollout_id)
        assert row is not None
        full = load_full(session, row)
    return sorted(i for i, d in full.devices.items() if d.wave == 0)
