"""The telemetry group-commit writer (server/telemetry/writer.py) on real SQLite and PostgreSQL.

Two writers on two engines stand for two API processes: they store interleaved batches of one
device into the same hours at the same time, with retries of the same batch sent to both. No
window may be lost or counted twice: the hourly roll-up must hold exactly the windows of the
batches stored once, every retry must be answered as a duplicate, and a window outside the
clock-skew bounds is skipped as ``store_batch`` skips it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from slmops.protocol.telemetry import TelemetryBatch
from slmops.server.db.models import Device
from slmops.server.db.session import open_database
from slmops.server.settings import load_settings
from slmops.server.telemetry.store import Counters
from slmops.server.telemetry.tables import (
    TelemetryBatchRow,
    TelemetryCounter,
    TelemetryHourlyRow,
    TelemetryWindowRow,
)
from slmops.server.telemetry.writer import TelemetryWriter

HOUR = 3600.0
ACTIVE = {"name": "m", "version": "1", "variant": "q4", "digest": "sha256:" + "0" * 64}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'w.db'}"
        return
    from pg import postgres_cluster

    with postgres_cluster() as url:
        yield url


def _batch(start: float, requests: int, batch_id: str | None = None) -> TelemetryBatch:
    window = {
        "start": start,
        "end": start + 60,
        "model": "m",
        "version": "1",
        "variant": "q4",
        "requests": requests,
        "histograms": {},
    }
    doc = {"batch_id": batch_id or uuid.uuid4().hex, "windows": [window]}
    return TelemetryBatch.model_validate(doc)


async def _deliver(writers: list[TelemetryWriter], key: str, now: float) -> list[Any]:
    hour = (now // HOUR - 2) * HOUR  # the two last full hours
    batches = [_batch(hour + 60 * i, requests=i + 1) for i in range(120)]
    retries = batches[::6]
    jobs = [w.store_for(key, b, now=now) for i, b in enumerate(batches) for w in [writers[i % 2]]]
    jobs += [writers[(i + 1) % 2].store_for(key, b, now=now) for i, b in enumerate(retries)]
    late = _batch(now - 3 * 86400, requests=5)  # started three days ago: not stored
    jobs.append(writers[0].store_for(key, late, now=now))
    return list(await asyncio.gather(*jobs))


def test_two_writers_store_every_window_once(db_url: str, tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "a", db_url=db_url)
    first = open_database(settings)
    second = open_database(settings, migrate=False)  # another "process": its own pool
    with first.sessions() as s:
        s.add(Device(device_id="d1", credential_hash="h" * 64, profile="rpi5", active=ACTIVE))
        s.commit()
    counters = Counters()
    writers = [
        # small groups, so the two interleave and meet each other's merges
        TelemetryWriter(first.engine, first.sessions, counters, max_batch=4),
        TelemetryWriter(second.engine, second.sessions, counters, max_batch=4),
    ]
    for w in writers:
        w.start()
    now = time.time()
    try:
        answers = asyncio.run(_deliver(writers, "h" * 64, now))
    finally:
        for w in writers:
            w.stop()
    stored, retried, late = answers[:120], answers[120:-1], answers[-1]
    assert len(retried) == 20
    for i, a in enumerate(stored):  # a retry may land first: then the original is the duplicate
        if i % 6:
            assert not a.duplicate
        else:
            assert sorted([a.duplicate, retried[i // 6].duplicate]) == [False, True]
    assert late.windows == 0 and late.skipped == 1 and not late.duplicate
    with first.sessions() as s:
        hourly = list(s.scalars(select(TelemetryHourlyRow)))
        assert len(hourly) == 2  # two hours, one device, one version
        assert sum(h.aggregate["windows"] for h in hourly) == 120
        assert sum(h.aggregate["requests"] for h in hourly) == sum(range(1, 121))
        assert {h.version for h in hourly} == {"1"} and {h.profile for h in hourly} == {"rpi5"}
        assert s.scalar(select(func.count()).select_from(TelemetryWindowRow)) == 120
        assert s.scalar(select(func.count()).select_from(TelemetryBatchRow)) == 121
        counted = {c.name: c.value for c in s.scalars(select(TelemetryCounter))}
    assert counted.get("batches") == 121 and counted.get("duplicate_batches") == 20
    assert counted.get("windows") == 120
    assert sum(w.groups for w in writers) < 121  # batches shared transactions
    assert sum(w.fallbacks for w in writers) == 0  # no group had to be stored one by one
    first.dispose()
    second.dispose()


def test_samples_stored_in_the_group_nul_replaced(db_url: str, tmp_path: Path) -> None:
    """A sample's free text with NUL in it is stored with the group's other batches (on
    PostgreSQL the rows travel as one JSON parameter, which cannot carry ``\\u0000``: before
    the wire schema replaced it, such a sample sent its whole group down the one-by-one
    path), and a batch without samples stores SQL NULL on both engines."""
    db = open_database(load_settings(data_dir=tmp_path / "a", db_url=db_url))
    with db.sessions() as s:
        s.add(Device(device_id="d1", credential_hash="h" * 64, profile="rpi5", active=ACTIVE))
        s.commit()
    now = time.time()
    hour = (now // HOUR - 1) * HOUR
    sample = {"at": hour, "prompt": "a\x00b", "response": "ok\x00", "redactions": 0}
    with_sample = TelemetryBatch.model_validate(
        _batch(hour, 1).model_dump(mode="json", by_alias=True) | {"samples": [sample]}
    )
    writer = TelemetryWriter(db.engine, db.sessions, Counters())

    async def deliver() -> list[Any]:
        jobs = [writer.store_for("h" * 64, with_sample, now=now)]
        jobs += [writer.store_for("h" * 64, _batch(hour + 60 * i, 1), now=now) for i in (1, 2)]
        return list(await asyncio.gather(*jobs))

    writer.start()
    try:
        answers = asyncio.run(deliver())
    finally:
        writer.stop()
    assert [a.windows for a in answers] == [1, 1, 1]
    assert writer.fallbacks == 0
    with db.sessions() as s:
        got = {r.batch_id: r.samples for r in s.scalars(select(TelemetryBatchRow))}
        nulls = s.scalar(
            select(func.count())
            .select_from(TelemetryBatchRow)
            .where(TelemetryBatchRow.samples.is_(None))
        )
    assert got[with_sample.batch_id] == [sample | {"prompt": "a\ufffdb", "response": "ok\ufffd"}]
    assert nulls == 2  # SQL NULL, not a JSON null
    db.dispose()
