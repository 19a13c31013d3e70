"""Telemetry carries the LoRA adapter: windows of two adapters over one model stay apart from
ingestion (their own window and hourly rows) to the operator's ``group_by=adapter`` query and
the Prometheus labels. A real `slmops server run` on SQLite, as test_telemetry.py does; and
migration 0009 over existing rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from factories.server import Server, _server
from factories.telemetry import batch, device, post, query, window
from slmops.server.db.session import alembic_config, open_database, upgrade
from slmops.server.settings import load_settings
from slmops.server.telemetry.tables import TelemetryHourlyRow, TelemetryWindowRow

HOUR = 3600


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory, env={"SLMOPS_ROLLOUT_TICK_SECONDS": "3600"})


def served(start: float, adapter: str | None, latency: list[float], **kw: Any) -> dict[str, Any]:
    w = window(start, version=kw.pop("version", "1.0"), latency=latency, **kw)
    if adapter is not None:
        w["adapter"] = adapter
    return w  # without an adapter the key is absent, as an agent older than adapters sends it


def test_windows_of_two_adapters_are_grouped_apart(server: Server) -> None:
    cred = device(server, "adp-1", "rpi5", runs=("1.0",))
    hour = (int(time.time()) // HOUR - 2) * HOUR  # a whole hour in the past
    windows = [
        served(hour + 60, "site-a:1", [20.0, 30.0]),
        served(hour + 360, "site-b:2", [200.0, 300.0, 400.0]),
        served(hour + 660, None, [50.0]),
        served(hour + 960, "site-a:1", [40.0]),
        served(hour + 1260, "site-c:1", [60.0], version="9.9"),  # a version it never ran
    ]
    assert post(server, cred, batch(windows)).is_success

    # since=None: whole hours, read from the roll-up; since inside the hour: from the windows
    for since in (None, hour + 1):
        params: dict[str, Any] = {"group_by": "adapter", "where": "device_id=adp-1"}
        if since is not None:
            params |= {"since": since, "until": hour + HOUR}
        rows = query(server, **params)
        got = {r["adapter"]: (r["requests"], r["windows"]) for r in rows}
        # the unattributed window (9.9) loses its adapter with its model: counted as none
        assert got == {"site-a:1": (3, 2), "site-b:2": (3, 1), None: (2, 2)}, (since, rows)
        assert [r["adapter"] for r in rows] == ["site-a:1", "site-b:2", None]  # None last
        slow = next(r for r in rows if r["adapter"] == "site-b:2")
        assert slow["latency_p50_ms"] > 100  # site-b's latencies were not merged into site-a's

    two = query(server, group_by=["version", "adapter"], where="adapter=site-a:1")
    assert [(r["version"], r["adapter"], r["requests"]) for r in two] == [("1.0", "site-a:1", 3)]

    db = open_database(load_settings(data_dir=server.data))
    try:
        with db.sessions() as session:
            hourly = session.scalars(
                select(TelemetryHourlyRow).where(TelemetryHourlyRow.device_id == "adp-1")
            ).all()
            stored = session.scalars(
                select(TelemetryWindowRow.adapter).where(TelemetryWindowRow.device_id == "adp-1")
            ).all()
    finally:
        db.dispose()
    assert sorted(r.adapter for r in hourly) == ["", "", "site-a:1", "site-b:2"]  # 1.0 and none
    assert sorted(stored) == ["", "", "site-a:1", "site-a:1", "site-b:2"]

    text = httpx.get(server.url + "/metrics").text
    assert 'slmops_telemetry_requests_total{adapter="site-a:1",version="1.0"} 3.0' in text
    assert 'slmops_telemetry_requests_total{adapter="site-b:2",version="1.0"} 3.0' in text


def test_an_adapter_name_too_long_is_refused(server: Server) -> None:
    cred = device(server, "adp-2", "rpi5", runs=("1.0",))
    r = post(server, cred, batch([served(time.time() - 400, "x" * 201, [10.0])]))
    assert r.status_code == 422, r.text
    assert "adapter" in r.text


def test_migration_0009_keeps_existing_hours_and_downgrades(tmp_path: Path) -> None:
    """Rows from before 0009 read as "no adapter"; after it two adapters may share an hour key;
    the downgrade folds them back under the old unique key."""
    settings = load_settings(data_dir=tmp_path)
    db = open_database(settings, migrate=False)
    cols = "hour, device_id, model, version, variant, profile, rollout_id, aggregate, revision"
    row = "3600, 'd', 'm', '1.0', 'q4', 'rpi5', '', '{}', 0"
    try:
        upgrade(db.engine, "0008")
        with db.engine.begin() as conn:
            conn.execute(text(f"INSERT INTO telemetry_hourly ({cols}) VALUES ({row})"))
        upgrade(db.engine)
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT adapter FROM telemetry_hourly")).scalars().all() == [
                ""
            ]
            conn.execute(
                text(f"INSERT INTO telemetry_hourly ({cols}, adapter) VALUES ({row}, 'a:1')")
            )
            again = text(f"INSERT INTO telemetry_hourly ({cols}, adapter) VALUES ({row}, 'a:1')")
            # the key still holds, adapter included
            with pytest.raises(IntegrityError), conn.begin_nested():
                conn.execute(again)
        cfg = alembic_config()
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0008")
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM telemetry_hourly")).scalar() == 1
            names = {c["name"] for c in inspect(conn).get_columns("telemetry_hourly")}
            assert "adapter" not in names
    finally:
        db.dispose()
