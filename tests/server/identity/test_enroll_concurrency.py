"""First enrollments under concurrency (issue 12's fast path, server/api/device/first_enroll.py).

On SQLite with one `slmops server run` and on PostgreSQL with two processes on one database:
concurrent enrollments of distinct ids all count on the token's ``uses`` (a hot row every
enrollment updates), each device gets the token's labels and one audit entry; concurrent
enrollments of one id enroll it exactly once (the others wait for approval and their
credentials do not work); an unusable token (revoked, expired) writes nothing and is refused
with the same error as before.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from control_plane import ControlPlane, inventory
from slmops.protocol.device import EnrollRequest, Inventory
from slmops.server.api.device.first_enroll import enroll_new
from slmops.server.audit import AuditEntry
from slmops.server.db import create_enrollment_token, find_device, find_device_by_credential
from slmops.server.db.models import EnrollmentToken, as_utc, utcnow
from slmops.server.db.session import Database, open_database
from slmops.server.settings import load_settings

N_DEVICES = 120
N_SAME = 16


class Fleet:
    """One or two API processes on one database, and the calls the tests make."""

    def __init__(self, planes: list[ControlPlane]) -> None:
        self.planes = planes
        self.admin = planes[0].admin

    def api(self, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(
            method,
            self.planes[0].url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
        )
        assert r.status_code < 400, r.text
        return r.json()

    def token(self, labels: dict[str, str], seconds: int = 3600) -> tuple[str, str]:
        made = self.api(
            "POST", "/api/v1/enrollment-tokens", {"labels": labels, "expires_in_seconds": seconds}
        )
        return str(made["id"]), str(made["token"])

    def uses(self, token_id: str) -> int:
        rows = self.api("GET", "/api/v1/enrollment-tokens")["data"]
        return int(next(r["uses"] for r in rows if r["id"] == token_id))

    def enroll_all(self, ids: list[str], token: str) -> list[httpx.Response]:
        """Enroll ``ids`` 24 at a time, alternating between the API processes."""

        def one(i_id: tuple[int, str]) -> httpx.Response:
            i, device_id = i_id
            url = self.planes[i % len(self.planes)].url
            body = {"device_id": device_id, "enrollment_token": token, "inventory": inventory()}
            return httpx.post(url + "/device/v1/enroll", json=body, timeout=30)

        with ThreadPoolExecutor(24) as pool:
            return list(pool.map(one, enumerate(ids)))

    def checkin(self, credential: str) -> int:
        r = httpx.post(
            self.planes[-1].url + "/device/v1/checkin",
            json={"inventory": inventory()},
            headers={"Authorization": f"Bearer {credential}"},
            timeout=10,
        )
        return r.status_code


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    if request.param == "sqlite":
        cp = ControlPlane(tmp_path_factory.mktemp("enroll-sqlite"))
        cp.start()
        try:
            yield Fleet([cp])
        finally:
            cp.stop()
        return
    from pg import postgres_cluster

    with postgres_cluster() as url:
        os.environ["SLMOPS_DB_URL"] = url  # the CLI calls and both servers use it
        planes = [ControlPlane(tmp_path_factory.mktemp(f"enroll-pg{i}")) for i in range(2)]
        try:
            for cp in planes:
                cp.start()
            yield Fleet(planes)
        finally:
            for cp in planes:
                cp.stop()
            del os.environ["SLMOPS_DB_URL"]


def test_concurrent_first_enrollments_all_count(fleet: Fleet) -> None:
    token_id, token = fleet.token({"site": "s1"})
    ids = [f"conc-{i:04d}" for i in range(N_DEVICES)]
    answers = fleet.enroll_all(ids, token)
    assert Counter(r.status_code for r in answers) == {201: N_DEVICES}, answers[0].text
    credentials = {r.json()["credential"] for r in answers}
    assert len(credentials) == N_DEVICES
    assert fleet.uses(token_id) == N_DEVICES  # no lost update on the hot row
    doc = fleet.api("GET", f"/api/v1/devices/{ids[7]}")
    assert doc["operator_labels"] == {"site": "s1"} and doc["status"] == "active", doc
    audit = fleet.api("GET", f"/api/v1/audit?target=device/{ids[7]}")["data"]
    assert [(e["action"], e["actor_kind"], e["actor"]) for e in audit] == [
        ("device.enroll", "enrollment-token", token_id)
    ]
    assert fleet.checkin(answers[7].json()["credential"]) == 200


def test_concurrent_enrollments_of_one_id_enroll_it_once(fleet: Fleet) -> None:
    token_id, token = fleet.token({"site": "s2"})
    answers = fleet.enroll_all(["same-id"] * N_SAME, token)
    codes = Counter(r.status_code for r in answers)
    assert codes[201] == 1 and set(codes) <= {201, 202, 409}, codes
    assert fleet.uses(token_id) == codes[201] + codes[202]
    [winner] = [r.json()["credential"] for r in answers if r.status_code == 201]
    assert fleet.checkin(winner) == 200
    for r in answers:
        if r.status_code == 202:  # a pending request: its credential waits for approval
            assert r.json()["status"] == "pending"
            assert fleet.checkin(r.json()["credential"]) == 401


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_unusable_token_writes_nothing(fleet: Fleet, how: str) -> None:
    token_id, token = fleet.token({"site": "s3"}, seconds=1 if how == "expired" else 3600)
    if how == "revoked":
        fleet.api("POST", f"/api/v1/enrollment-tokens/{token_id}/revoke")
    else:
        time.sleep(1.2)
    [r] = fleet.enroll_all([f"never-{how}"], token)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == f"enrollment_token_{how}"
    assert token_id in r.json()["error"]["message"]
    assert fleet.uses(token_id) == 0
    gone = httpx.get(
        fleet.planes[0].url + f"/api/v1/devices/never-{how}",
        headers={"Authorization": f"Bearer {fleet.admin}"},
        timeout=10,
    )
    assert gone.status_code == 404


# --- the fast path itself, in process on both databases ---------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = open_database(load_settings(data_dir=tmp_path))
        yield database
        database.dispose()
        return
    from pg import postgres_cluster

    with postgres_cluster() as url:
        database = open_database(load_settings(data_dir=tmp_path, db_url=url))
        yield database
        database.dispose()


def test_fast_path_enrolls_only_new_ids_with_a_usable_token(db: Database) -> None:
    """The general path would answer every case too: this checks the fast path itself took
    the new id (and wrote what the general path writes) and left the others to it."""
    with db.sessions() as s:
        token = create_enrollment_token(
            s, labels={"site": "s4"}, expires_at=utcnow() + timedelta(hours=1)
        )
    body = EnrollRequest(
        enrollment_token=token.secret, device_id="fast-1", inventory=Inventory(**inventory())
    )
    with db.sessions() as s:
        credential = enroll_new(s, body)
        assert credential is not None
        s.commit()
    with db.sessions() as s:
        device = find_device_by_credential(s, secret=credential)
        assert device is not None and device.device_id == "fast-1"
        assert device.operator_labels == {"site": "s4"} and device.status == "active"
        assert as_utc(device.enrolled_at) <= utcnow()
        [entry] = s.scalars(select(AuditEntry).where(AuditEntry.target == "device/fast-1"))
        assert (entry.action, entry.actor) == ("device.enroll", token.row.id)
        assert s.get(EnrollmentToken, token.row.id).uses == 1  # type: ignore[union-attr]
        assert enroll_new(s, body) is None  # the id exists: nothing written, general path
        s.get(EnrollmentToken, token.row.id).revoked_at = utcnow()  # type: ignore[union-attr]
        s.commit()
    with db.sessions() as s:
        fresh = body.model_copy(update={"device_id": "fast-2"})
        assert enroll_new(s, fresh) is None  # revoked: the general path says so
        assert find_device(s, device_id="fast-2") is None
        assert s.get(EnrollmentToken, token.row.id).uses == 1  # type: ignore[union-attr]
