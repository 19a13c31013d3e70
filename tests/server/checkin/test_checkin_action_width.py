"""Action statuses whose key outgrows its column are stored bounded (checkin.bounded): an adapter's
status names ``adapter NAME:VERSION`` with names up to 255 characters, which PostgreSQL refuses
in ``device_actions.version`` (String(64)) unless it is cut; cut with a hash suffix, two long
names stay two rows and a repeated report updates its own row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from control_plane import inventory
from factories.fleet_db import database
from slmops.protocol.device import ActionStatus
from slmops.server.checkin import KEY_WIDTH, bounded, record_actions
from slmops.server.db.models import Device, DeviceAction
from slmops.server.db.session import Database


@pytest.fixture(params=["postgresql", "sqlite"])
def db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Database]:
    with database(request.param, tmp_path, monkeypatch) as found:
        yield found


def test_long_adapter_statuses_are_stored_bounded_and_distinct(db: Database) -> None:
    names = ["a" * 254 + "1", "a" * 254 + "2"]  # differ only past the cut
    with db.sessions() as s:
        s.add(Device(device_id="d1", credential_hash="0" * 64, inventory=inventory()))
        s.commit()
        statuses = [
            ActionStatus(rollout_id="r" * 80, version=f"adapter {n}:1.0.0", state="downloading")
            for n in names
        ]
        statuses.append(ActionStatus(version="1.2.0", state="active"))  # short: unchanged
        record_actions(s, "d1", statuses)
        s.commit()
        again = ActionStatus.model_validate(statuses[0].model_dump() | {"state": "active"})
        record_actions(s, "d1", [again])  # the same key: its row is updated
        s.commit()
        rows = list(s.scalars(select(DeviceAction).order_by(DeviceAction.id)))
    assert [(r.version, r.state) for r in rows] == [
        (bounded(f"adapter {names[0]}:1.0.0"), "active"),
        (bounded(f"adapter {names[1]}:1.0.0"), "downloading"),
        ("1.2.0", "active"),
    ]
    assert rows[0].version != rows[1].version
    assert all(len(r.version) <= KEY_WIDTH and len(r.rollout_id) <= KEY_WIDTH for r in rows)
    assert rows[0].version.startswith("adapter aaaa") and rows[2].rollout_id == ""


def test_bounded_keeps_what_fits() -> None:
    assert bounded("1.0.0") == "1.0.0"
    assert bounded("x" * KEY_WIDTH) == "x" * KEY_WIDTH
    cut = bounded("x" * (KEY_WIDTH + 1))
    assert len(cut) == KEY_WIDTH and cut != bounded("x" * (KEY_WIDTH + 2))
