"""Rollout cohorts computed in SQL give the figures the whole-state computation gives.

A small fleet on a real SQLite database, with real telemetry stored through ``store_batch``:
two hardware classes, canaries (moved by wave 0), queued devices on their old version, a device
already on the target (skipped), a device reporting as another class than it was matched in,
devices outside the rollout on the versions the rollout's devices came from (baseline) or on
another model (neither), windows spread over three hours so both the hourly roll-up and the
edge windows are read; on SQLite and PostgreSQL. ``figures_for`` on the summary alone (the rows are joined in SQL) must
equal ``figures_for`` on the state with every record loaded (the computation as it was), the
request counts must equal what the test posted, and no statement may read the rollout's rows
without a JOIN or a GROUP BY.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from slmops.protocol.telemetry import BOUNDS, TelemetryBatch
from slmops.server.db.models import Device
from slmops.server.db.session import Database, open_database
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
from slmops.server.rollouts.store import load, load_full, save
from slmops.server.rollouts.tables import Rollout
from slmops.server.settings import load_settings
from slmops.server.telemetry.cohorts import figures_for
from slmops.server.telemetry.query import summarize
from slmops.server.telemetry.store import HOUR, store_batch

RID = "coh-1"
TARGET = "2.0"
ORIGIN = {"pi": "1.0", "jetson": "0.9"}
POLICY = RolloutPolicy.model_validate(
    {
        "waves": [{"count": 6}, {"percent": 100}],
        "gates": {
            "min_soak_seconds": 100000,
            "timeout_seconds": 200000,
            "metrics": [{"metric": "latency_p95_ms", "better": "lower", "min_samples": 1}],
        },
    }
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Database]:
    """The same SQL on both engines (PostgreSQL: a throwaway cluster, tests/pg.py)."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            from pg import postgres_cluster

            monkeypatch.setenv("SLMOPS_DB_URL", stack.enter_context(postgres_cluster()))
        else:
            monkeypatch.delenv("SLMOPS_DB_URL", raising=False)  # SQLite in tmp_path
        database = open_database(load_settings(data_dir=tmp_path))
        assert database.engine.dialect.name == request.param
        try:
            yield database
        finally:
            database.dispose()


def members() -> list[MatchedDevice]:
    out = [
        MatchedDevice(device_id=f"pi-{i:02d}", hardware_class="pi", current_version=ORIGIN["pi"])
        for i in range(12)
    ]
    out += [
        MatchedDevice(device_id=f"jet-{i:02d}", hardware_class="jetson", current_version="0.9")
        for i in range(8)
    ]
    out.append(MatchedDevice(device_id="pi-there", hardware_class="pi", current_version=TARGET))
    return out


def started(now: float) -> RolloutState:
    state = create_rollout(RID, TARGET, now=now, policy=POLICY)
    state, _ = step(state, DevicesMatched(devices=members()), now)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), now)
    for device_id in state.assigned:
        state, _ = step(state, DeviceReport(device_id=device_id, state="active"), now)
    return state


def store_as_rows(db: Database, state: RolloutState) -> None:
    """As the server keeps it: the summary on the rollout row, one row per device."""
    with db.sessions() as session:
        row = Rollout(
            id=RID,
            blueprint="coh",
            model="m",
            target_version=TARGET,
            state_json=state.to_json(),
            status=state.status.value,
            revision=0,
            seq=1,
        )
        session.add(row)
        session.commit()
        loaded = load(session, row)
        assert loaded.inline
        assert save(session, row, loaded, loaded.state)
        session.commit()


def window(start: float, version: str, latency: float, n: int, model: str = "m") -> Any:
    """One minute of ``n`` requests, every one in the latency bucket of ``latency``."""
    counts = [0.0] * (len(BOUNDS["latency_ms"]) + 1)
    counts[bisect_left(BOUNDS["latency_ms"], latency)] = float(n)
    return {
        "start": start,
        "end": start + 60,
        "model": model,
        "version": version,
        "variant": "q4",
        "requests": n,
        "histograms": {"latency_ms": {"counts": counts, "sum": latency * n, "count": n}},
    }


def post(db: Database, device_id: str, profile: str, version: str, model: str, n: int) -> None:
    """Three windows of ``n`` requests, two and one hours back and now (hourly and edges)."""
    now = time.time()
    with db.sessions() as session:
        device = session.scalar(select(Device).where(Device.device_id == device_id))
        if device is None:
            device = Device(
                device_id=device_id,
                credential_hash=uuid.uuid4().hex,
                profile=profile,
                active={"name": model, "version": version, "variant": "q4"},
            )
            session.add(device)
            session.commit()
        starts = [now - 2 * HOUR - 60, now - HOUR, now - 120]
        wins = [window(s, version, 100.0, n, model) for s in starts]
        batch = TelemetryBatch.model_validate({"batch_id": uuid.uuid4().hex, "windows": wins})
        stored = store_batch(session, device, batch)
        assert stored.windows == 3, stored


def test_sql_cohorts_equal_the_whole_state_computation(db: Database) -> None:
    now = time.time()
    state = started(now - 3 * HOUR)
    store_as_rows(db, state)
    canaries = set(state.assigned)
    assert len(canaries) == 6
    expected: Counter[tuple[str, str]] = Counter()  # (class, cohort) -> requests
    for m in members():
        n = 10 + len(expected) % 7
        if m.device_id == "pi-there":  # skipped: on the target, in no cohort
            post(db, m.device_id, "pi", TARGET, "m", n)
            continue
        if m.device_id == "pi-11":  # reports as another class than it was matched in: neither
            version = TARGET if m.device_id in canaries else ORIGIN["pi"]
            post(db, m.device_id, "jetson", version, "m", n)
            continue
        if m.device_id in canaries:
            version = TARGET
            expected[m.hardware_class, "canary"] += 3 * n
        else:
            version = ORIGIN[m.hardware_class]
            expected[m.hardware_class, "baseline"] += 3 * n
        post(db, m.device_id, m.hardware_class, version, "m", n)
    # outside the rollout: same model on an origin version of its class -> baseline
    post(db, "out-pi", "pi", "1.0", "m", 5)
    post(db, "out-jet", "jetson", "0.9", "m", 4)
    expected["pi", "baseline"] += 15
    expected["jetson", "baseline"] += 12
    # outside, but not counted: another class's origin version, another model, no rollout version
    post(db, "out-wrong", "jetson", "1.0", "m", 50)
    post(db, "out-other", "pi", "1.0", "other", 50)
    post(db, "out-old", "pi", "0.5", "m", 50)

    since = now - 3 * HOUR
    statements: list[str] = []

    def capture(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        statements.append(statement)

    with db.sessions() as session:
        row = session.get(Rollout, RID)
        assert row is not None
        summary = RolloutState.from_json(row.state_json)
        assert not summary.devices  # the rows path
        event.listen(db.engine, "before_cursor_execute", capture)
        try:
            by_sql = figures_for(session, summary, since)
        finally:
            event.remove(db.engine, "before_cursor_execute", capture)
        whole = load_full(session, row)
        by_state = figures_for(session, whole, since)
        grouped = summarize(session, group_by=["cohort:" + RID, "profile"], since=since)

    assert by_sql == by_state
    requests = {
        (f.hardware_class, f.cohort.value): f.samples
        for f in by_sql
        if f.metric == "latency_p95_ms"
    }
    assert requests == dict(expected)
    from_query = {(g["profile"], g["cohort:" + RID]): g["requests"] for g in grouped}
    assert from_query == dict(expected)
    touching = [s for s in statements if "rollout_devices" in s]
    assert touching, "the rows were not read at all"
    for s in touching:
        assert "JOIN" in s.upper() or "GROUP BY" in s.upper(), s
