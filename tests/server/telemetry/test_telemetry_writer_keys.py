"""The telemetry writer reads the devices of a group by credential digest itself (one thread hop
per request; ``TelemetryWriter.store_for``), on real SQLite and PostgreSQL: in one group, a known
credential's batch is stored under the server's record of the device, a retry of it is a
duplicate, and a credential no device holds fails only its own request (``UnknownDevice``,
answered 401 by the route).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from slmops.protocol.telemetry import TelemetryBatch
from slmops.server.db.models import Device
from slmops.server.db.session import open_database
from slmops.server.settings import load_settings
from slmops.server.telemetry.store import Counters, Stored
from slmops.server.telemetry.tables import TelemetryHourlyRow, TelemetryWindowRow
from slmops.server.telemetry.writer import TelemetryWriter, UnknownDevice

KNOWN, UNKNOWN = "a" * 64, "b" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'k.db'}"
        return
    from pg import postgres_cluster

    with postgres_cluster() as url:
        yield url


def _batch(start: float) -> TelemetryBatch:
    window = {"start": start, "end": start + 60, "requests": 3, "histograms": {}}
    return TelemetryBatch.model_validate({"batch_id": uuid.uuid4().hex, "windows": [window]})


async def _one_group(writer: TelemetryWriter, now: float) -> list[Stored | BaseException]:
    batch = _batch(now - 120)
    tasks = [
        asyncio.create_task(writer.store_for(KNOWN, batch, now=now)),
        asyncio.create_task(writer.store_for(UNKNOWN, _batch(now - 120), now=now)),
        asyncio.create_task(writer.store_for(KNOWN, batch, now=now)),  # a retry
    ]
    await asyncio.sleep(0.05)  # all three queued before the thread starts: one group
    writer.start()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def test_store_for_reads_devices_by_credential(db_url: str, tmp_path: Path) -> None:
    db = open_database(load_settings(data_dir=tmp_path / "d", db_url=db_url))
    with db.sessions() as s:
        s.add(Device(device_id="d1", credential_hash=KNOWN, profile="rpi5"))
        s.commit()
    writer = TelemetryWriter(db.engine, db.sessions, Counters())
    try:
        stored, unknown, retry = asyncio.run(_one_group(writer, time.time()))
    finally:
        writer.stop()
    assert isinstance(stored, Stored) and stored.windows == 1 and not stored.duplicate
    assert isinstance(unknown, UnknownDevice)
    assert isinstance(retry, Stored) and retry.duplicate and retry.windows == 0
    assert writer.groups == 1 and writer.fallbacks == 0
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(TelemetryWindowRow)) == 1
        hourly = list(s.scalars(select(TelemetryHourlyRow)))
        assert [(h.device_id, h.profile, h.aggregate["requests"]) for h in hourly] == [
            ("d1", "rpi5", 3.0)
        ]
    db.dispose()
