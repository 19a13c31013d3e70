"""Rollout storage on a real SQLite database: rows per device, a summary on the rollout row.

- migration 0008 splits a stored document (every device inline) into rows and a summary whose
  tally counts them, and the rollout carries on from there;
- a document still holding its devices (written by an older server, or by hand) is read as it
  is and moved into rows on the next write;
- a device report writes its own row and the summary, nothing else; a wave start reads the
  queued rows; a deleted device leaves its rollouts with its counts.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import func, select, text

from slmops.protocol.fleet import DeviceActionState
from slmops.server.context import Context
from slmops.server.db.session import Database, make_engine, open_database, upgrade
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts.machine import (
    DeviceReport,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutPolicy,
    RolloutState,
    Tally,
    create_rollout,
    step,
)
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import forget_device, load_full
from slmops.server.rollouts.tables import Rollout, RolloutDevice
from slmops.server.settings import load_settings

POLICY = RolloutPolicy.from_data(
    {
        "waves": [{"count": 1}, {"percent": 100}],
        "gates": {"min_soak_seconds": 0, "timeout_seconds": 100, "min_reported": 1},
    }
)


def inline_document(rollout_id: str, n: int) -> RolloutState:
    """A started rollout over ``n`` devices, as a complete in-memory state (devices inline)."""
    state = create_rollout(rollout_id, "2.0", now=0.0, policy=POLICY)
    devices = [
        MatchedDevice(device_id=f"d{i}", hardware_class="pi5", current_version="1.0")
        for i in range(n)
    ]
    devices.append(MatchedDevice(device_id="there", hardware_class="pi5", current_version="2.0"))
    state, _ = step(state, DevicesMatched(devices=devices), 0.0)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), 0.0)
    return state


def add_row(db: Database, state: RolloutState) -> None:
    with db.sessions() as session:
        session.add(
            Rollout(
                id=state.rollout_id,
                blueprint=state.rollout_id,
                model="m",
                target_version=state.target_version,
                state_json=state.to_json(),
                status=state.status.value,
                revision=0,
                seq=1,
            )
        )
        session.commit()


def device_rows(db: Database, rollout_id: str) -> dict[str, str]:
    with db.sessions() as session:
        query = select(RolloutDevice.device_id, RolloutDevice.status).where(
            RolloutDevice.rollout_id == rollout_id
        )
        return {d: s for d, s in session.execute(query).all()}


def test_migration_splits_stored_documents(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    engine = make_engine(settings.database_url)
    upgrade(engine, "0007")
    state = inline_document("old-1", 4)
    # as a server before 0008 stored it: the whole document, with no tally key at all
    raw = json.loads(state.to_json())
    del raw["tally"]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO rollouts (id, blueprint, model, target_version, state_json, status,"
                " revision, seq, created_at, updated_at) VALUES ('old-1', 'old', 'm', '2.0',"
                " :doc, 'running', 3, 1, '2026-01-01', '2026-01-01')"
            ),
            {"doc": json.dumps(raw)},
        )
    upgrade(engine)
    engine.dispose()
    db = open_database(settings)
    try:
        rows = device_rows(db, "old-1")
        assert len(rows) == 5 and rows["there"] == "skipped"
        assert sorted(rows.values()).count("scheduled") == 1  # the canary
        with db.sessions() as session:
            row = session.get(Rollout, "old-1")
            assert row is not None
            summary = RolloutState.from_json(row.state_json)
            assert summary.devices == {}
            assert summary.tally == Tally.of(state.devices.values())
            assert load_full(session, row).devices == state.devices
        # and it carries on: the canary reports, wave 1 takes the other three
        (canary,) = [d for d, s in rows.items() if s == "scheduled"]
        ctx = Context(BlobStore(tmp_path), 60.0, now=10.0)
        with db.sessions() as session:
            report = DeviceReport(device_id=canary, state=DeviceActionState.ACTIVE)
            commands = run_event(session, "old-1", report, ctx)
        assigned = sorted(c.device_id for c in commands if c.kind == "assign-target")
        assert assigned == sorted(set(rows) - {canary, "there"})
    finally:
        db.dispose()


def test_an_inline_document_moves_into_rows_on_its_next_write(tmp_path: Path) -> None:
    db = open_database(load_settings(data_dir=tmp_path))
    ctx = Context(BlobStore(tmp_path), 60.0, now=10.0)
    try:
        state = inline_document("inline-1", 3)
        add_row(db, state)  # as tests and older servers write it: devices in the document
        assert device_rows(db, "inline-1") == {}
        canary = next(i for i, d in state.devices.items() if d.wave == 0)
        with db.sessions() as session:
            run_event(session, "inline-1", DeviceReport(device_id=canary, state="active"), ctx)
            row = session.get(Rollout, "inline-1", populate_existing=True)
            assert row is not None
            assert RolloutState.from_json(row.state_json).devices == {}
            full = load_full(session, row)
        assert len(device_rows(db, "inline-1")) == 4
        assert full.tally == Tally.of(full.devices.values())
        assert full.tally.assigned == 3 and full.wave == 1
    finally:
        db.dispose()


def test_reports_touch_one_row_and_a_deleted_device_leaves_with_its_counts(
    tmp_path: Path,
) -> None:
    db = open_database(load_settings(data_dir=tmp_path))
    ctx = Context(BlobStore(tmp_path), 60.0, now=10.0)
    try:
        add_row(db, create_rollout("r-1", "2.0", now=0.0, policy=POLICY))
        devices = [
            MatchedDevice(device_id=f"d{i}", hardware_class="pi5", current_version="1.0")
            for i in range(20)
        ]
        with db.sessions() as session:
            run_event(session, "r-1", DevicesMatched(devices=devices), ctx)
            start = OperatorCommand(action=OperatorAction.START, actor="t")
            run_event(session, "r-1", start, ctx)
        rows = device_rows(db, "r-1")
        (canary,) = [d for d, s in rows.items() if s == "scheduled"]
        with db.sessions() as session:
            before = session.scalar(select(func.count()).select_from(RolloutDevice))
            report = DeviceReport(device_id=canary, state=DeviceActionState.DOWNLOADING)
            run_event(session, "r-1", report, ctx)
            row = session.get(Rollout, "r-1", populate_existing=True)
            assert row is not None and row.revision == 3
        after = device_rows(db, "r-1")
        assert {d for d in rows if rows[d] != after[d]} == {canary}
        assert after[canary] == "downloading" and before == 20
        # a report from a device the rollout never moved is dropped: nothing written
        with db.sessions() as session:
            queued = next(d for d, s in after.items() if s == "queued")
            run_event(session, "r-1", DeviceReport(device_id=queued, state="active"), ctx)
            row = session.get(Rollout, "r-1", populate_existing=True)
            assert row is not None and row.revision == 3  # same instant: nothing changed
        # a deleted device: its row and its counts go
        with db.sessions() as session:
            row = session.get(Rollout, "r-1")
            assert row is not None
            assert forget_device(session, row, canary)
            session.commit()
            row = session.get(Rollout, "r-1", populate_existing=True)
            assert row is not None
            full = load_full(session, row)
        assert canary not in full.devices and len(full.devices) == 19
        assert full.tally == Tally.of(full.devices.values())
    finally:
        db.dispose()
