"""A revoked device leaves the rollouts it was in, so they can complete without it.

A revoked device cannot check in any more, so it would never report: counted as a member, it
would hold its wave open until the timeout. Revocation takes it out like a deletion does (its
row and its counts), a later settle does not match it back in, and the rollout completes when
the remaining devices report. Once more over the operator API on a real server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from control_plane import ControlPlane
from slmops.protocol.fleet import DeviceActionState
from slmops.server import identity
from slmops.server.audit import Actor
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.models import Device
from slmops.server.db.session import Database, open_database
from slmops.server.reconcile import settle
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts.machine import (
    DeviceReport,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutPolicy,
    RolloutState,
    create_rollout,
    step,
)
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import device_record, load, save
from slmops.server.rollouts.tables import Rollout
from slmops.server.settings import load_settings

POLICY = RolloutPolicy.model_validate(
    {
        "waves": [{"percent": 100}],
        "gates": {"min_soak_seconds": 0, "timeout_seconds": 600, "min_reported": 1.0},
    }
)
DEVICES = ("d-1", "d-2", "d-3")


def running_rollout(db: Database, rollout_id: str, blueprint: str) -> None:
    """Every device moved by one wave, d-1 already active; stored as summary + rows, with the
    devices and the blueprint that governs them."""
    now = time.time()
    state = create_rollout(rollout_id, "2.0.0", now=now, policy=POLICY)
    matched = [
        MatchedDevice(device_id=d, hardware_class="pi", current_version="1.0.0") for d in DEVICES
    ]
    state, _ = step(state, DevicesMatched(devices=matched), now)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), now)
    state, _ = step(state, DeviceReport(device_id="d-1", state=DeviceActionState.ACTIVE), now)
    assert state.status.value == "running" and state.tally.assigned == 3
    with db.sessions() as session:
        for d in DEVICES:
            session.add(
                Device(device_id=d, credential_hash=identity.unusable_hash(), labels={"f": "x"})
            )
        spec = {"selector": {"f": "x"}, "model": {"name": "m", "version": "2.0.0"}}
        session.add(BlueprintRow(name=blueprint, spec=spec, stable_version="1.0.0"))
        row = Rollout(
            id=rollout_id,
            blueprint=blueprint,
            model="m",
            target_version="2.0.0",
            state_json=state.to_json(),
            status="running",
            revision=0,
            seq=1,
        )
        session.add(row)
        session.commit()
        loaded = load(session, row)
        assert save(session, row, loaded, loaded.state)  # as the server keeps it: rows
        session.commit()


def summary(db: Database, rollout_id: str) -> RolloutState:
    with db.sessions() as session:
        row = session.get(Rollout, rollout_id)
        assert row is not None
        return RolloutState.from_json(row.state_json)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    monkeypatch.delenv("SLMOPS_DB_URL", raising=False)  # SQLite in tmp_path
    database = open_database(load_settings(data_dir=tmp_path))
    yield database
    database.dispose()


def test_revoking_a_device_lets_its_rollout_complete(db: Database, tmp_path: Path) -> None:
    running_rollout(db, "r-1", "b")
    ctx = Context(BlobStore(tmp_path), 60.0)
    with db.sessions() as session:
        device = session.scalar(select(Device).where(Device.device_id == "d-2"))
        assert device is not None
        touched = identity.revoke(session, device, Actor("operator", "tok", "op"), ctx, reason="x")
        assert touched == ["r-1"]
        assert device_record(session, "r-1", "d-2") is None  # its row is gone
        revoked = session.scalar(select(Device).where(Device.device_id == "d-2"))
        assert revoked is not None and revoked.status == identity.REVOKED
    state = summary(db, "r-1")
    assert state.status.value == "running"  # still waits for d-3, no longer for d-2
    assert (state.tally.matched, state.tally.assigned, state.tally.wave(0).devices) == (2, 2, 2)

    with db.sessions() as session:  # an apply elsewhere re-matches devices: not the revoked one
        settle(session, ctx)
    assert summary(db, "r-1").tally.matched == 2

    with db.sessions() as session:
        report = DeviceReport(device_id="d-3", state=DeviceActionState.ACTIVE)
        run_event(session, "r-1", report, ctx)
    assert summary(db, "r-1").status.value == "succeeded"


def test_revoking_the_last_one_missing_completes_the_rollout_at_once(
    db: Database, tmp_path: Path
) -> None:
    running_rollout(db, "r-2", "b2")
    ctx = Context(BlobStore(tmp_path), 60.0)
    with db.sessions() as session:
        run_event(session, "r-2", DeviceReport(device_id="d-3", state="active"), ctx)
        device = session.scalar(select(Device).where(Device.device_id == "d-2"))
        assert device is not None
        identity.revoke(session, device, Actor("operator", "tok", "op"), ctx, reason=None)
    assert summary(db, "r-2").status.value == "succeeded"  # ticked right after


def test_revoke_over_the_api_reports_the_rollouts_it_left(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp")
    database = open_database(load_settings(data_dir=cp.data))
    try:
        running_rollout(database, "api-1", "api")
    finally:
        database.dispose()
    cp.start()
    try:
        r = httpx.post(
            f"{cp.url}/api/v1/devices/d-2/revoke",
            json={"reason": "stolen"},
            headers={"Authorization": f"Bearer {cp.admin}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["rollouts"] == ["api-1"] and r.json()["status"] == "revoked"
        doc = cp.rollout("api-1")
        assert doc["matched"] == 2 and "d-2" not in {d["device_id"] for d in doc["device_list"]}
        assert doc["status"] == "running"
    finally:
        cp.stop()
