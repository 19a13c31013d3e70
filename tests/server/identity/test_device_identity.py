"""Device identity lifecycle (issue 11, finding 1) against a real `slmops server run`.

The takeover reproduction (a label-less enrollment token re-enrolling an existing id) must
leave the enrolled device untouched and put the request up for approval; re-enrolling with the
current credential, approve/reject, revoke, delete, rotation, enrollment-token revoke and
maximum lifetime, the audit trail of each, and who may do what. The HTTP suite runs on SQLite
and PostgreSQL; the rollout accounting and the real agent run on SQLite only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from control_plane import ControlPlane, inventory, start_agent, status, stop_agent, wait_for
from helpers import free_port
from slmops.protocol.fleet import DeviceActionState
from slmops.server import identity
from slmops.server.audit import Actor
from slmops.server.context import Context
from slmops.server.db.models import Device
from slmops.server.db.session import open_database
from slmops.server.registry.store import BlobStore
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
from slmops.server.rollouts.tables import Rollout
from slmops.server.settings import load_settings

SERVER_CLI = [sys.executable, "-m", "slmops.cli.server"]
MAIN_CLI = [sys.executable, "-m", "slmops.cli.main"]


class Plane:
    """The running server plus one token per role and the calls the tests make."""

    def __init__(self, cp: ControlPlane, kind: str = "sqlite") -> None:
        self.cp, self.url, self.kind = cp, cp.url, kind
        self.admin = cp.admin
        self.operator = self.token("operator")
        self.viewer = self.token("viewer")

    def token(self, role: str) -> str:
        r = self.call("POST", "/api/v1/tokens", self.cp.admin, {"name": f"t-{role}", "role": role})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def call(self, method: str, path: str, token: str | None, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, json=body, headers=headers, timeout=10)

    def enrollment_token(self, labels: dict[str, str] | None = None) -> tuple[str, str]:
        body = {"labels": labels or {}}
        r = self.call("POST", "/api/v1/enrollment-tokens", self.operator, body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"]), str(r.json()["token"])

    def enroll(
        self, device_id: str, token: str | None, credential: str | None = None
    ) -> httpx.Response:
        body: dict[str, Any] = {"device_id": device_id, "inventory": inventory()}
        if token is not None:
            body["enrollment_token"] = token
        if credential is not None:
            body["credential"] = credential
        return httpx.post(self.url + "/device/v1/enroll", json=body, timeout=10)

    def checkin(self, credential: str) -> int:
        r = httpx.post(
            self.url + "/device/v1/checkin",
            json={"inventory": inventory()},
            headers={"Authorization": f"Bearer {credential}"},
            timeout=10,
        )
        return r.status_code

    def device(self, device_id: str) -> dict[str, Any]:
        r = self.call("GET", f"/api/v1/devices/{device_id}", self.viewer)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def audit(self, target: str) -> list[dict[str, Any]]:
        r = self.call("GET", f"/api/v1/audit?target={target}", self.operator)
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data


def error(r: httpx.Response, status_code: int, code: str) -> dict[str, Any]:
    assert r.status_code == status_code, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code, err
    assert set(err) == {"code", "message", "where", "hint"}
    return err


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Plane]:
    if request.param == "sqlite":
        yield from _plane(tmp_path_factory, "sqlite")
        return
    from pg import postgres_cluster

    with postgres_cluster() as url:
        os.environ["SLMOPS_DB_URL"] = url  # the CLI calls and the server both use it
        try:
            yield from _plane(tmp_path_factory, "postgresql")
        finally:
            del os.environ["SLMOPS_DB_URL"]


def _plane(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Iterator[Plane]:
    cp = ControlPlane(tmp_path_factory.mktemp("identity"))
    cp.start()
    try:
        yield Plane(cp, kind)
    finally:
        cp.stop()


def enrolled(plane: Plane, device_id: str, labels: dict[str, str] | None = None) -> str:
    _, token = plane.enrollment_token(labels)
    r = plane.enroll(device_id, token)
    assert r.status_code == 201, r.text
    return str(r.json()["credential"])


# --- the takeover, and the way back -----------------------------------------------------------


def test_label_less_token_cannot_take_over_an_enrolled_device(plane: Plane) -> None:
    real = enrolled(plane, "victim-1")
    token_id, attacker_token = plane.enrollment_token()  # the default: no labels
    r = plane.enroll("victim-1", attacker_token)
    assert r.status_code == 202, r.text
    doc = r.json()
    assert doc["status"] == "pending" and doc["request_id"].startswith("req_")
    assert "pending operator approval" in doc["detail"]
    pending = doc["credential"]
    assert plane.checkin(real) == 200  # the real device keeps working
    assert plane.checkin(pending) == 401  # the requester gets nothing yet
    again = plane.enroll("victim-1", attacker_token, credential=pending)  # polling
    assert again.status_code == 202 and again.json()["request_id"] == doc["request_id"]
    dev = plane.device("victim-1")
    assert dev["status"] == "active"
    assert dev["pending_request"]["id"] == doc["request_id"]
    assert dev["pending_request"]["token_id"] == token_id
    [entry] = [e for e in plane.audit("device/victim-1") if e["action"] == "device.enroll-request"]
    assert entry["actor_kind"] == "enrollment-token" and entry["actor"] == token_id
    assert entry["detail"]["request_id"] == doc["request_id"]
    # a reject ends it: the device still works, the pending credential is refused for good
    r = plane.call("POST", "/api/v1/devices/victim-1/reject", plane.operator, {})
    assert r.status_code == 200 and r.json()["action"] == "reject", r.text
    error(plane.enroll("victim-1", attacker_token, credential=pending), 403, "enrollment_rejected")
    assert plane.checkin(real) == 200 and plane.checkin(pending) == 401


def test_reenroll_with_the_current_credential_needs_no_token_and_no_approval(
    plane: Plane,
) -> None:
    old = enrolled(plane, "self-1")
    r = plane.enroll("self-1", None, credential=old)  # e.g. the enrollment token expired
    assert r.status_code == 201 and r.json()["status"] == "enrolled", r.text
    new = r.json()["credential"]
    assert plane.checkin(old) == 401 and plane.checkin(new) == 200
    error(plane.enroll("self-1", None, credential=old), 401, "invalid_enrollment_token")
    actions = [(e["action"], e["actor_kind"], e["actor"]) for e in plane.audit("device/self-1")]
    assert ("device.rotate", "device", "self-1") in actions
    assert actions[-1][0] == "device.enroll"  # oldest last


def test_approve_moves_the_pending_credential_onto_the_device(plane: Plane) -> None:
    old = enrolled(plane, "box-1", {"site": "oslo"})
    _, token = plane.enrollment_token({"site": "oslo"})
    first = plane.enroll("box-1", token).json()
    second = plane.enroll("box-1", token).json()  # a newer request supersedes the first
    assert first["request_id"] != second["request_id"]
    path = "/api/v1/devices/box-1/approve"
    error(plane.call("POST", path, plane.viewer, {}), 403, "forbidden")
    stale = {"request_id": first["request_id"]}
    error(plane.call("POST", path, plane.operator, stale), 409, "request_changed")
    r = plane.call("POST", path, plane.operator, {"request_id": second["request_id"]})
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    assert plane.checkin(second["credential"]) == 200
    assert plane.checkin(old) == 401 and plane.checkin(first["credential"]) == 401
    error(plane.call("POST", path, plane.operator, {}), 409, "no_pending_request")
    [entry] = [e for e in plane.audit("device/box-1") if e["action"] == "device.approve"]
    operator_id = plane.call("GET", "/api/v1/tokens", plane.admin).json()
    assert entry["actor_kind"] == "operator" and entry["role"] == "operator"
    assert entry["actor"] in {t["id"] for t in operator_id["data"] if t["role"] == "operator"}
    assert entry["detail"] == {"request_id": second["request_id"]}
    assert entry["at"].endswith(("+00:00", "Z"))
    # a token for another site cannot even ask
    _, rome = plane.enrollment_token({"site": "rome"})
    error(plane.enroll("box-1", rome), 403, "scope_mismatch")


def test_revoke_cuts_the_device_off_and_it_returns_only_by_approval(plane: Plane) -> None:
    cred = enrolled(plane, "lost-1")
    error(plane.call("POST", "/api/v1/devices/lost-1/revoke", plane.viewer, {}), 403, "forbidden")
    r = plane.call("POST", "/api/v1/devices/lost-1/revoke", plane.operator, {"reason": "stolen"})
    assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
    assert plane.checkin(cred) == 401
    assert plane.device("lost-1")["status"] == "revoked"  # the record stays
    _, token = plane.enrollment_token()
    back = plane.enroll("lost-1", token, credential=cred)  # the old credential proves nothing
    assert back.status_code == 202, back.text
    assert plane.device("lost-1")["pending_request"]["reason"] == "device revoked"
    r = plane.call("POST", "/api/v1/devices/lost-1/approve", plane.operator, {})
    assert r.status_code == 200 and r.json()["status"] == "active"
    assert plane.checkin(back.json()["credential"]) == 200 and plane.checkin(cred) == 401
    [entry] = [e for e in plane.audit("device/lost-1") if e["action"] == "device.revoke"]
    assert entry["detail"] == {"reason": "stolen"} and entry["actor_kind"] == "operator"


def test_delete_decommissions(plane: Plane) -> None:
    cred = enrolled(plane, "gone-1")
    error(plane.call("DELETE", "/api/v1/devices/gone-1", plane.viewer), 403, "forbidden")
    r = plane.call("DELETE", "/api/v1/devices/gone-1", plane.operator)
    assert r.status_code == 200 and r.json()["action"] == "delete", r.text
    assert plane.checkin(cred) == 401
    error(plane.call("GET", "/api/v1/devices/gone-1", plane.viewer), 404, "not_found")
    error(plane.call("DELETE", "/api/v1/devices/gone-1", plane.operator), 404, "not_found")
    assert next(e["action"] for e in plane.audit("device/gone-1")) == "device.delete"
    # the id is free again: a valid token enrolls a new box under it, no approval needed
    assert enrolled(plane, "gone-1")


def test_device_rotates_its_credential(plane: Plane) -> None:
    old = enrolled(plane, "rot-9")
    r = httpx.post(
        plane.url + "/device/v1/credential", headers={"Authorization": f"Bearer {old}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    new = r.json()["credential"]
    assert new != old and plane.checkin(old) == 401 and plane.checkin(new) == 200
    again = httpx.post(
        plane.url + "/device/v1/credential", headers={"Authorization": f"Bearer {old}"}, timeout=10
    )
    assert again.status_code == 401
    assert ("device.rotate", "device") in [
        (e["action"], e["actor_kind"]) for e in plane.audit("device/rot-9")
    ]


def test_operator_rotation_forces_an_approved_reenrollment(plane: Plane) -> None:
    cred = enrolled(plane, "rot-10")
    error(plane.call("POST", "/api/v1/devices/rot-10/rotate", plane.viewer), 403, "forbidden")
    r = plane.call("POST", "/api/v1/devices/rot-10/rotate", plane.operator)
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    assert plane.checkin(cred) == 401
    _, token = plane.enrollment_token()
    pending = plane.enroll("rot-10", token, credential=cred)
    assert pending.status_code == 202
    assert plane.call("POST", "/api/v1/devices/rot-10/approve", plane.operator).status_code == 200
    assert plane.checkin(pending.json()["credential"]) == 200


# --- enrollment tokens --------------------------------------------------------------------------


def test_enrollment_token_revoke_and_maximum_lifetime(plane: Plane) -> None:
    token_id, token = plane.enrollment_token()
    path = f"/api/v1/enrollment-tokens/{token_id}/revoke"
    error(plane.call("POST", path, plane.viewer), 403, "forbidden")
    r = plane.call("POST", path, plane.operator)
    assert r.status_code == 200 and r.json()["revoked_at"], r.text
    err = error(plane.enroll("new-1", token), 401, "enrollment_token_revoked")
    assert token_id in err["message"]
    error(
        plane.call("POST", "/api/v1/enrollment-tokens/enr_nope/revoke", plane.operator),
        404,
        "not_found",
    )
    [entry] = plane.audit(f"enrollment-token/{token_id}")[:1]
    assert entry["action"] == "enrollment-token.revoke" and entry["actor_kind"] == "operator"

    too_long = {"labels": {}, "expires_in_seconds": 31 * 86400}
    err = error(
        plane.call("POST", "/api/v1/enrollment-tokens", plane.operator, too_long),
        422,
        "invalid_lifetime",
    )
    assert "maximum" in err["message"] and "30 days" in err["message"]
    forever: dict[str, Any] = {"labels": {}, "expires_in_seconds": None}
    err = error(
        plane.call("POST", "/api/v1/enrollment-tokens", plane.operator, forever),
        422,
        "invalid_lifetime",
    )
    assert "must expire" in err["message"]

    if plane.kind != "sqlite":
        return  # the CLI part is the same code on either database: run it once
    # the CLI (writing the database directly) obeys the same limit and can revoke
    data = plane.cp.data
    res = subprocess.run(
        [*SERVER_CLI, "enrollment-token", "create", "--data", str(data), "--expires-in", "5w"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "maximum" in res.stderr + res.stdout, res.stderr
    made = json.loads(
        subprocess.run(
            [*SERVER_CLI, "enrollment-token", "create", "--data", str(data), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    res = subprocess.run(
        [*SERVER_CLI, "enrollment-token", "revoke", made["id"], "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    error(plane.enroll("new-2", made["token"]), 401, "enrollment_token_revoked")
    actors = {(e["action"], e["actor_kind"]) for e in plane.audit(f"enrollment-token/{made['id']}")}
    assert actors == {("enrollment-token.create", "cli"), ("enrollment-token.revoke", "cli")}


# --- the audit log and the CLI -------------------------------------------------------------------


def test_audit_is_for_operators_only_and_the_cli_reads_it(plane: Plane) -> None:
    cred = enrolled(plane, "aud-1")
    error(plane.call("GET", "/api/v1/audit", plane.viewer), 403, "forbidden")
    error(plane.call("GET", "/api/v1/audit", cred), 401, "unauthorized")  # a device credential
    error(plane.call("GET", "/api/v1/audit", None), 401, "unauthorized")
    assert plane.call("GET", "/api/v1/audit", plane.admin).status_code == 200
    if plane.kind != "sqlite":
        return  # the CLI is a client of the API above: run it once
    env = {**os.environ, "SLMOPS_SERVER": plane.url, "SLMOPS_TOKEN": plane.operator}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MAIN_CLI, *args], capture_output=True, text=True, timeout=60, env=env
        )

    res = cli("devices", "revoke", "aud-1", "--reason", "test", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["status"] == "revoked", res.stderr
    res = cli("devices", "list", "--json")
    assert res.returncode == 0, res.stderr
    rows = {d["device_id"]: d for d in json.loads(res.stdout)["data"]}
    assert rows["aud-1"]["status"] == "revoked"
    res = cli("get", "audit", "--target", "device/aud-1", "--json")
    assert res.returncode == 0, res.stderr
    got = [e["action"] for e in json.loads(res.stdout)["data"]]
    assert got == ["device.revoke", "device.enroll"]
    res = cli("devices", "approve", "aud-1", "--json")  # nothing pending: exit 2, the envelope
    assert res.returncode == 2 and "no enrollment request waiting" in res.stdout, res.stdout
    res = cli("devices", "delete", "aud-1")
    assert res.returncode == 0 and "delete" in res.stdout, res.stderr
    viewer_env = env | {"SLMOPS_TOKEN": plane.viewer}
    res = subprocess.run(
        [*MAIN_CLI, "get", "audit"], capture_output=True, text=True, timeout=60, env=viewer_env
    )
    assert res.returncode == 2 and "403" in res.stderr + res.stdout


# --- a deleted device does not block a rollout ---------------------------------------------------


def test_deleting_a_device_takes_it_out_of_a_running_wave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLMOPS_DB_URL", raising=False)
    db = open_database(load_settings(data_dir=tmp_path))
    now = time.time()
    policy = RolloutPolicy.model_validate(
        {
            "waves": [{"percent": 100}],
            "gates": {"min_soak_seconds": 0, "timeout_seconds": 600, "min_reported": 1.0},
        }
    )
    state = create_rollout("r-1", "2.0.0", now=now, policy=policy)
    matched = [
        MatchedDevice(device_id=d, hardware_class="pi", current_version="1.0.0")
        for d in ("d-1", "d-2")
    ]
    state, _ = step(state, DevicesMatched(devices=matched), now)
    state, _ = step(state, OperatorCommand(action=OperatorAction.START, actor="t"), now)
    state, _ = step(state, DeviceReport(device_id="d-1", state=DeviceActionState.ACTIVE), now)
    assert state.status.value == "running"  # waits for d-2, which will never report
    try:
        with db.sessions() as session:
            for d in ("d-1", "d-2"):
                session.add(Device(device_id=d, credential_hash=identity.unusable_hash()))
            session.add(
                Rollout(
                    id="r-1", blueprint="b", state_json=state.to_json(), status="running", seq=1
                )
            )
            session.commit()
            device = session.scalar(select(Device).where(Device.device_id == "d-2"))
            assert device is not None
            actor = Actor("operator", "tok_test", "operator")
            touched = identity.delete(session, device, actor, Context(BlobStore(tmp_path), 60.0))
            assert touched == ["r-1"]
            row = session.get(Rollout, "r-1", populate_existing=True)
            assert row is not None
            assert row.status == "succeeded", row.state_json
            assert session.scalar(select(Device).where(Device.device_id == "d-2")) is None
    finally:
        db.dispose()


# --- the real agent -----------------------------------------------------------------------------


def test_agent_waits_for_approval_after_an_operator_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLMOPS_DB_URL", raising=False)
    cp = ControlPlane(tmp_path / "server")
    cp.start()
    plane = Plane(cp)
    _, token = plane.enrollment_token()
    data = tmp_path / "agent"
    agent = start_agent(data, cp.url, free_port(), "--enroll-token", token, device_id="edge-9")
    try:
        wait_for("enrollment", lambda: status(data).get("checkins", 0) >= 1)
        first = (data / "credential").read_text().strip()
        r = plane.call("POST", "/api/v1/devices/edge-9/rotate", plane.operator)
        assert r.status_code == 200, r.text
        wait_for("pending approval", lambda: status(data).get("state") == "pending-approval")
        request_id = plane.device("edge-9")["pending_request"]["id"]
        pending = (data / "credential").read_text().strip()
        assert pending != first
        time.sleep(1.5)  # the agent keeps asking with its pending credential: same request
        assert plane.device("edge-9")["pending_request"]["id"] == request_id
        n = status(data)["checkins"]
        r = plane.call(
            "POST", "/api/v1/devices/edge-9/approve", plane.operator, {"request_id": request_id}
        )
        assert r.status_code == 200, r.text
        wait_for("check-ins after approval", lambda: status(data).get("checkins", 0) > n)
        assert status(data)["state"] == "ok"
        assert (data / "credential").read_text().strip() == pending
        assert agent.poll() is None
    finally:
        stop_agent(agent)
        cp.stop()
