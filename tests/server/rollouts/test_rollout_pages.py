"""A rollout is read a page of devices at a time, with its counts on every page.

A real `slmops server run` on SQLite; a rollout over 250 devices (plus skipped and unplaceable
ones) stored as the server stores it (summary + one row per device). Paging with the cursor
covers every device exactly once, in id order; ``wave=`` and ``status=`` filter; the counts on
every page equal the rows'; bad parameters get the error envelope; ``slmops rollout get``
prints counts and pages through every device with ``--devices``; the dashboard shows the first
page and a link to the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import ControlPlane
from slmops.server.db.session import open_database
from slmops.server.rollouts.machine import (
    DeviceReport,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutPolicy,
    create_rollout,
    step,
)
from slmops.server.rollouts.store import load, load_full, save
from slmops.server.rollouts.tables import Rollout
from slmops.server.settings import load_settings

RID = "pages-1"
N = 250
POLICY = RolloutPolicy.model_validate(
    {
        "waves": [{"count": 7}, {"percent": 100}],
        "gates": {"min_soak_seconds": 100000, "timeout_seconds": 200000},
    }
)


def matched() -> list[MatchedDevice]:
    out = [
        MatchedDevice(device_id=f"dev-{i:04d}", hardware_class="pi", current_version="1.0")
        for i in range(N)
    ]
    out += [
        MatchedDevice(device_id=f"there-{i}", hardware_class="pi", current_version="2.0")
        for i in range(3)
    ]
    out += [
        MatchedDevice(
            device_id=f"small-{i}",
            hardware_class="tiny",
            current_version="1.0",
            unplaceable="needs 2 GB RAM",
        )
        for i in range(2)
    ]
    return out


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    data = tmp_path_factory.mktemp("pages")
    plane = ControlPlane(data)  # the server and this fixture open the same database
    state = create_rollout(RID, "2.0", now=0.0, policy=POLICY)
    state, _ = step(state, DevicesMatched(devices=matched()), 0.0)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), 0.0)
    canaries = sorted(state.assigned)
    state, _ = step(state, DeviceReport(device_id=canaries[0], state="active"), 1.0)
    state, _ = step(state, DeviceReport(device_id=canaries[1], state="downloading"), 1.0)
    db = open_database(load_settings(data_dir=data))
    try:
        with db.sessions() as session:  # as the server keeps it: a summary and a row each
            row = Rollout(
                id=RID,
                blueprint="pages",
                model="m",
                target_version="2.0",
                state_json=state.to_json(),
                status=state.status.value,
                revision=0,
                seq=1,
            )
            session.add(row)
            session.commit()
            loaded = load(session, row)
            assert save(session, row, loaded, loaded.state)
            session.commit()
            session.expire(row)  # save() wrote through Core
            assert not load(session, row).inline
    finally:
        db.dispose()
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def get(cp: ControlPlane, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{cp.url}/api/v1/rollouts/{RID}",
        params=params,
        headers={"Authorization": f"Bearer {cp.admin}"},
        timeout=30,
    )


def every_page(cp: ControlPlane, **params: Any) -> tuple[list[str], list[dict[str, Any]]]:
    seen: list[str] = []
    docs: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        r = get(cp, **params, **({"after": after} if after else {}))
        assert r.status_code == 200, r.text
        doc = r.json()
        docs.append(doc)
        seen += [d["device_id"] for d in doc["device_list"]]
        after = doc["device_page"]["next"]
        if after is None:
            return seen, docs


def test_pages_cover_every_device_once_with_the_counts_on_each(cp: ControlPlane) -> None:
    seen, docs = every_page(cp, limit=100)
    assert len(docs) == 3  # 255 devices: 100, 100, 55
    assert [len(d["device_list"]) for d in docs] == [100, 100, 55]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == N + 5
    statuses = Counter(d["status"] for doc in docs for d in doc["device_list"])
    for doc in docs:  # the summary counts, on every page, equal what the rows say
        assert doc["by_status"] == dict(statuses)
        assert doc["matched"] == N + 5 and doc["devices"] == N
        assert doc["unplaceable"] == {"needs N GB RAM": 2}
        assert doc["wave_list"][0]["devices"] == 7 and doc["wave_list"][0]["succeeded"] == 1
    assert statuses == {"queued": N - 7, "scheduled": 5, "active": 1, "downloading": 1} | {
        "skipped": 3,
        "unplaceable": 2,
    }
    default = get(cp).json()
    assert len(default["device_list"]) == 100 and default["device_page"]["limit"] == 100
    counts = get(cp, limit=0).json()
    assert counts["device_list"] == [] and counts["device_page"]["next"] is None
    assert counts["by_status"] == dict(statuses)
    big, _ = every_page(cp, limit=1000)
    assert big == seen


def test_filters(cp: ControlPlane) -> None:
    canaries, _ = every_page(cp, wave=0, limit=3)
    assert len(canaries) == 7
    with open_db(cp) as state_devices:
        assert canaries == sorted(i for i, d in state_devices.items() if d.wave == 0)
    skipped, _ = every_page(cp, status="skipped", limit=2)
    assert skipped == ["there-0", "there-1", "there-2"]
    active, _ = every_page(cp, wave=0, status="active")
    assert len(active) == 1 and active[0] in canaries
    assert every_page(cp, wave=1)[0] == []
    unplaceable = get(cp, status="unplaceable").json()["device_list"]
    assert [d["detail"] for d in unplaceable] == ["needs 2 GB RAM"] * 2


class open_db:
    """Every record of the rollout, read straight from the database (what pages must match)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.db = open_database(load_settings(data_dir=cp.data))

    def __enter__(self) -> dict[str, Any]:
        with self.db.sessions() as session:
            row = session.get(Rollout, RID)
            assert row is not None
            return dict(load_full(session, row).devices)

    def __exit__(self, *exc: object) -> None:
        self.db.dispose()


def test_bad_parameters_get_the_envelope(cp: ControlPlane) -> None:
    bad = ({"limit": 1001}, {"limit": -1}, {"status": "nope"}, {"wave": -1}, {"after": "a b"})
    for params in bad:
        r = get(cp, **params)
        assert r.status_code in (400, 422), (params, r.status_code, r.text)
        assert "error" in r.json(), r.text


def cli(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLMOPS_TOKEN", "SLMOPS_SERVER")}
    env |= {"SLMOPS_SERVER": cp.url, "SLMOPS_TOKEN": cp.admin, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "slmops.cli.main", "rollout", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_cli_counts_by_default_and_every_device_with_devices(cp: ControlPlane) -> None:
    res = cli(cp, "get", RID)
    assert res.returncode == 0, res.stderr
    assert f"{N + 5} matched" in res.stdout and f"{N - 7} queued" in res.stdout
    assert "dev-0000" not in res.stdout  # counts only: no device table
    res = cli(cp, "get", RID, "--devices", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    ids = [d["device_id"] for d in doc["device_list"]]
    assert len(ids) == len(set(ids)) == N + 5 and doc["device_page"]["next"] is None
    res = cli(cp, "get", RID, "--devices", "--status", "skipped")
    assert res.returncode == 0, res.stderr
    assert "there-2" in res.stdout and "dev-0000" not in res.stdout
    res = cli(cp, "get", RID, "--json")  # the API's first page, as before
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)
    assert len(first["device_list"]) == 100 and first["device_page"]["next"] == "dev-0099"
    res = cli(cp, "get", RID, "--devices", "--status", "nope", "--json")
    assert res.returncode != 0 and "status" in res.stdout + res.stderr


def test_dashboard_shows_counts_and_links_the_next_page(cp: ControlPlane, tmp_path: Path) -> None:
    with httpx.Client(base_url=cp.url, timeout=30) as c:
        r = c.post("/ui/login", data={"token": cp.admin, "next": f"/ui/rollouts/{RID}"})
        assert r.status_code == 303, r.text
        page = c.get(f"/ui/rollouts/{RID}").text
        assert f'data-status="queued">queued {N - 7}<' in page
        assert page.count("/ui/devices/") == 100
        assert 'data-testid="devices-next"' in page and "?after=dev-0099" in page
        last = c.get(f"/ui/rollouts/{RID}", params={"after": "dev-0199"}).text
        assert "small-1" in last and "dev-0199<" not in last
        assert 'data-testid="devices-next"' not in last
