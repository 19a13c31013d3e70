"""Rollouts end to end: a real `slmops server run` (SQLite, and PostgreSQL for the core flows),
real bundles pushed to its registry, devices simulated over the device API (enroll, check-in
with action statuses), operators over /api/v1/rollouts and `slmops rollout`.

The server ticks rollouts every 0.2 s (SLMOPS_ROLLOUT_TICK_SECONDS) so soak times and timeouts
of a second or two decide waves within the test. Every test uses its own blueprint and selector.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_blueprints import FITS, MODEL, make_inputs
from test_server_api import (
    CLI,
    Server,
    _server,
    assert_envelope,
    cli_json,
    credential,
    enrollment_token,
    inventory,
    make_token,
)

from helpers import free_port
from slmops.bundle.build import build_bundle
from slmops.bundle.registry import push
from slmops.protocol.device import DesiredState
from slmops.server.db.models import Rollout
from slmops.server.db.session import open_database
from slmops.server.registry.store import BlobStore
from slmops.server.rollout import (
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    create_rollout,
    step,
)
from slmops.server.rollouts import tick_all
from slmops.server.settings import load_settings

MAIN = [sys.executable, "-m", "slmops.cli.main"]
TICK = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"}
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
FINAL = {"succeeded", "rolled-back", "aborted"}


# --- servers and bundles ----------------------------------------------------------------------


def build_versions(root: Path, versions: tuple[str, ...]) -> dict[str, Path]:
    """One built bundle per version (fabricated variants, real bundle builder)."""
    out: dict[str, Path] = {}
    for version in versions:
        variants, report = make_inputs(root / version / "in", None)
        built = build_bundle(
            variants, report, name=MODEL, version=version, out=root / version / "bundle"
        )
        out[version] = built.path
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One built bundle per version, pushed to every server the module starts."""
    return build_versions(tmp_path_factory.mktemp("bundles"), VERSIONS)


def push_all(server: Server, bundles: dict[str, Path]) -> None:
    address = server.url.removeprefix("http://")
    for version, path in bundles.items():
        push(path, f"oci://{address}/{MODEL}:{version}", token=server.admin)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Iterator[Server]:
    """SQLite; most tests run here only."""
    for srv in _server(tmp_path_factory, env=TICK):
        push_all(srv, bundles)
        yield srv


def postgres_server(
    tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]
) -> Iterator[tuple[Server, str]]:
    """A server on a throwaway PostgreSQL with ``bundles`` pushed; yields it and its DB URL."""
    from pg import postgres_cluster

    with postgres_cluster() as url:
        started = _server(tmp_path_factory, env=TICK | {"SLMOPS_DB_URL": url})
        # only while starting (the CLI's token create must write to it): a module-scoped
        # fixture lives on after its tests, and the later ones here are SQLite-only
        os.environ["SLMOPS_DB_URL"] = url
        try:
            srv = next(started)
        finally:
            del os.environ["SLMOPS_DB_URL"]
        try:
            push_all(srv, bundles)
            yield srv, url
        finally:
            next(started, None)  # past its yield: stops the server


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def any_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[Server]:
    """The core flows on both databases (the SQLite one is the module's ``server``)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("server")
        return
    for srv, _url in postgres_server(tmp_path_factory, bundles):
        yield srv


# --- simulated devices and operator calls ----------------------------------------------------


@dataclass
class Dev:
    """A device speaking the device API; remembers every model it was told to run."""

    server: Server
    device_id: str
    cred: str
    active: dict[str, Any] | None = None
    told: list[tuple[str, str | None, bool] | None] = field(default_factory=list)
    reported: set[tuple[str, str, str]] = field(default_factory=set)

    def checkin(self, actions: list[dict[str, Any]] | None = None) -> DesiredState:
        body: dict[str, Any] = {"inventory": inventory(**FITS), "active": self.active}
        if actions:
            body["actions"] = actions
        r = httpx.post(
            self.server.url + "/device/v1/checkin",
            json=body,
            headers={"Authorization": f"Bearer {self.cred}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        desired = DesiredState.model_validate(r.json())
        m = desired.model
        self.told.append(None if m is None else (m.version, m.rollout_id, m.revert))
        return desired

    def report(
        self, rollout_id: str, version: str, state: str, stage: str | None = None
    ) -> DesiredState:
        """Report an action state; ``active``/``rolled-back`` also change what it runs."""
        if state in ("active", "rolled-back"):
            self.active = {
                "name": MODEL,
                "version": version,
                "variant": "q8",
                "digest": "sha256:" + "0" * 64,
            }
        action = {"rollout_id": rollout_id, "version": version, "state": state}
        if stage:
            action |= {"stage": stage, "detail": f"probe failed at {stage}"}
        return self.checkin([action])

    def follow(self) -> DesiredState:
        """Check in and carry out what it is told, as the agent does: install a version it does
        not run, and report the final state to the rollout that named it (once), also when it
        already runs that version (e.g. told to revert to the version it never left)."""
        desired = self.checkin()
        m = desired.model
        if m is None or m.rollout_id is None:
            return desired
        done = (m.rollout_id, m.version, "rolled-back" if m.revert else "active")
        if done in self.reported:
            return desired
        self.reported.add(done)
        return self.report(*done)


def devices(server: Server, fleet: str, n: int, prefix: str | None = None) -> list[Dev]:
    token = enrollment_token(server, {"fleet": fleet})
    out = []
    for i in range(n):
        device_id = f"{prefix or fleet}-{i}"
        out.append(Dev(server, device_id, credential(server, token, device_id, **FITS)))
    return out


def policy(waves: list[dict[str, Any]], **gates: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {k: gates.pop(k) for k in ("auto_advance", "start") if k in gates}
    base: dict[str, Any] = {
        "min_soak_seconds": 0,
        "timeout_seconds": 60,
        "min_reported": 1,
        "min_success_rate": 1,
    }
    return {"waves": waves, "gates": base | gates, **extra}


CANARY_THEN_ALL: list[dict[str, Any]] = [{"count": 1}, {"percent": 100}]


def apply(
    server: Server, name: str, version: str, rollout: dict[str, Any], token: str | None = None
) -> dict[str, Any]:
    doc = {
        "apiVersion": "slmops/v1",
        "kind": "Blueprint",
        "metadata": {"name": name},
        "spec": {"selector": {"fleet": name}, "model": {"name": MODEL, "version": version}}
        | {"rollout": rollout},
    }
    with server.client(token or server.admin) as c:
        r = c.put(f"/api/v1/blueprints/{name}", json=doc)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def get(server: Server, rollout_id: str) -> dict[str, Any]:
    with server.client(server.admin) as c:
        r = c.get(f"/api/v1/rollouts/{rollout_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def act(server: Server, rollout_id: str, action: str, **body: Any) -> httpx.Response:
    with server.client(server.admin) as c:
        return c.post(f"/api/v1/rollouts/{rollout_id}/{action}", json=body)


def until(
    server: Server, rollout_id: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 15
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = get(server, rollout_id)
        if ok(doc):
            return doc
        assert time.monotonic() < deadline, f"gave up waiting: {json.dumps(doc)[:2000]}"
        time.sleep(0.1)


def by_device(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in doc["device_list"]}


def in_wave(doc: dict[str, Any], wave: int) -> list[str]:
    return sorted(d["device_id"] for d in doc["device_list"] if d["wave"] == wave)


def results(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["gate"]: r for r in evaluation["results"]}


def establish(server: Server, name: str, fleet: list[Dev], version: str = "1.0.0") -> str:
    """Apply ``version`` in one wave and let every device install it: the stable version."""
    rid = apply(server, name, version, policy([{"percent": 100}]))["rollout"]
    assert rid
    for d in fleet:
        d.follow()
    until(server, rid, lambda r: r["status"] == "succeeded")
    return str(rid)


def stable(server: Server, name: str) -> str | None:
    with server.client(server.admin) as c:
        r = c.get(f"/api/v1/blueprints/{name}")
    assert r.status_code == 200, r.text
    version: str | None = r.json()["stable_version"]
    return version


def newcomer(server: Server, name: str, device_id: str) -> DesiredState:
    """What a device enrolling now under the blueprint's selector is told first."""
    cred = credential(server, enrollment_token(server, {"fleet": name}), device_id, **FITS)
    return Dev(server, device_id, cred).checkin()


def assert_consistent(fleet: list[Dev]) -> None:
    """No device was told two different things by one rollout: one target, then (maybe) one
    revert and never the target again; and once told a model, never "keep what runs" again."""
    for d in fleet:
        seen = [t for t in d.told if t is not None]
        first = d.told.index(seen[0]) if seen else len(d.told)
        assert all(t is not None for t in d.told[first:]), (d.device_id, d.told)
        for rid in {t[1] for t in seen if t[1]}:
            mine = [(version, revert) for version, r, revert in seen if r == rid]
            assert len({m for m in mine if not m[1]}) <= 1, (d.device_id, rid, d.told)
            assert len({m for m in mine if m[1]}) <= 1, (d.device_id, rid, d.told)
            reverted = [m[1] for m in mine]
            if True in reverted:
                assert all(reverted[reverted.index(True) :]), (d.device_id, rid, d.told)


# --- 1. the core flow, and 2. a health-check failure rolling back (SQLite and PostgreSQL) -----


def test_canary_then_rest_then_stable(any_server: Server) -> None:
    server, name = any_server, "core"
    fleet = devices(server, name, 3)
    for d in fleet:
        assert d.checkin().model is None
    waves: list[dict[str, Any]] = [{"count": 1}, {"percent": 100, "gates": {"min_soak_seconds": 0}}]
    rollout = policy(waves, min_soak_seconds=1.0)
    applied = apply(server, name, "1.0.0", rollout)
    rid = applied["rollout"]
    assert rid == f"{name}-1" and applied["devices"] == 3

    doc = get(server, rid)
    assert (doc["status"], doc["wave"], doc["waves"], doc["devices"]) == ("running", 0, 2, 3)
    [canary] = in_wave(doc, 0)
    assert doc["by_status"] == {"queued": 2, "scheduled": 1}
    assert [w["target"] for w in doc["wave_list"]] == [1, 3]
    assert doc["wave_list"][0]["started_at"] and doc["wave_list"][1]["started_at"] is None
    told = {d.device_id: d.checkin() for d in fleet}
    for device_id, desired in told.items():
        if device_id == canary:
            assert desired.model is not None
            assert (desired.model.version, desired.model.rollout_id) == ("1.0.0", rid)
            assert desired.model.variant == "q8" and not desired.model.revert
        else:
            assert desired.model is None  # keep what runs (nothing yet)

    first = next(d for d in fleet if d.device_id == canary)
    first.report(rid, "1.0.0", "active")
    doc = get(server, rid)
    wave0 = doc["wave_list"][0]
    if doc["wave"] == 0:  # soak (1 s) not over yet: waiting, with the numbers
        ev = results(wave0["evaluation"])
        assert wave0["evaluation"]["verdict"] == "wait"
        assert ev["soak"]["status"] == "wait" and ev["soak"]["threshold"] == 1.0
        assert ev["soak"]["observed"] < 1.0
        assert ev["reported"]["status"] == "pass" and ev["reported"]["observed"] == 1.0
        assert ev["success_rate"]["observed"] == 1.0 and ev["success_rate"]["samples"] == 1
        assert by_device(doc)[canary]["status"] == "active"

    doc = until(server, rid, lambda r: r["wave"] == 1)
    wave0 = doc["wave_list"][0]
    assert wave0["outcome"] == "passed" and wave0["ended_by"] is None
    decision = wave0["decision"]
    assert decision["verdict"] == "pass" and decision["wave"] == 0
    ev = results(decision)
    assert ev["soak"]["observed"] >= 1.0 and ev["soak"]["status"] == "pass"
    assert ev["success_rate"]["observed"] == 1.0 and ev["success_rate"]["threshold"] == 1.0
    assert ev["health_failures"]["observed"] == 0 and ev["health_failures"]["samples"] == 1
    assert in_wave(doc, 0) == [canary] and len(in_wave(doc, 1)) == 2

    for d in fleet:
        desired = d.checkin()
        assert desired.model is not None
        assert (desired.model.version, desired.model.rollout_id) == ("1.0.0", rid)
    for d in fleet:
        if d.device_id != canary:
            assert get(server, rid)["status"] == "running"
            d.report(rid, "1.0.0", "active")
    doc = until(server, rid, lambda r: r["status"] in FINAL)
    assert doc["status"] == "succeeded"
    assert doc["by_status"] == {"active": 3}
    assert all(d["status"] == "active" and d["from_version"] is None for d in doc["device_list"])
    assert doc["wave_list"][1]["outcome"] == "passed"
    assert results(doc["wave_list"][1]["decision"])["reported"]["samples"] == 2
    assert [h["to_status"] for h in doc["history"]] == ["running", "succeeded"]
    assert_consistent(fleet)
    assert stable(server, name) == "1.0.0"

    late = newcomer(server, name, f"{name}-new")
    assert late.model is not None and late.model.version == "1.0.0"
    assert late.model.rollout_id is None  # the stable version, directly
    assert by_device(get(server, rid)).get(f"{name}-new") is None


def test_health_check_failure_rolls_back(any_server: Server) -> None:
    server, name = any_server, "hc-rb"
    fleet = devices(server, name, 3)
    establish(server, name, fleet)
    rid = apply(server, name, "1.1.0", policy(CANARY_THEN_ALL, min_soak_seconds=30))["rollout"]
    assert rid == f"{name}-2" and stable(server, name) == "1.0.0"
    doc = get(server, rid)
    [canary] = in_wave(doc, 0)
    assert all(d["from_version"] == "1.0.0" for d in doc["device_list"])
    first = next(d for d in fleet if d.device_id == canary)
    m = first.checkin().model
    assert m is not None and (m.version, m.rollout_id) == ("1.1.0", rid)

    first.report(rid, "1.1.0", "installing")
    reverted = first.report(rid, "1.1.0", "failed", stage="health-checking")
    doc = get(server, rid)
    assert doc["status"] == "rolling-back"
    wave0 = doc["wave_list"][0]
    assert wave0["outcome"] == "failed"
    ev = results(wave0["decision"])
    assert wave0["decision"]["verdict"] == "fail"
    assert ev["health_failures"]["status"] == "fail"
    assert (ev["health_failures"]["observed"], ev["health_failures"]["threshold"]) == (1, 0)
    assert ev["success_rate"]["status"] == "fail" and ev["success_rate"]["observed"] == 0
    me = by_device(doc)[canary]
    assert (me["status"], me["failed_stage"]) == ("failed", "health-checking")
    assert "health" in doc["history"][-1]["reason"]

    assert reverted.model is not None
    assert (reverted.model.version, reverted.model.revert) == ("1.0.0", True)
    assert reverted.model.rollout_id == rid
    for d in fleet:  # the others were never moved: they keep 1.0.0, outside the rollout
        if d is not first:
            m = d.checkin().model
            assert m is not None and m.version == "1.0.0" and m.rollout_id is None

    first.report(rid, "1.0.0", "rolled-back")
    doc = get(server, rid)
    assert doc["status"] == "rolled-back"
    assert [h["to_status"] for h in doc["history"]] == ["running", "rolling-back", "rolled-back"]
    me = by_device(doc)[canary]
    assert (me["status"], me["failed_stage"]) == ("rolled-back", "health-checking")
    assert "after failing: probe failed at health-checking" in me["detail"]
    assert all(d["status"] == "queued" for d in doc["device_list"] if d["device_id"] != canary)
    assert stable(server, name) == "1.0.0"
    late = newcomer(server, name, f"{name}-new")
    assert late.model is not None and late.model.version == "1.0.0"  # stable stays 1.0.0
    assert_consistent(fleet)


def test_rollback_with_nothing_before_keeps_what_runs(server: Server) -> None:
    """A first rollout (devices had no model) that fails: nothing to revert to, so the moved
    device is done at once (the server reports it) and is told to keep what it runs."""
    name = "first-fail"
    fleet = devices(server, name, 2)
    rid = apply(server, name, "1.0.0", policy(CANARY_THEN_ALL, min_soak_seconds=30))["rollout"]
    [canary] = in_wave(get(server, rid), 0)
    first = next(d for d in fleet if d.device_id == canary)
    assert first.checkin().model is not None
    desired = first.report(rid, "1.0.0", "failed", stage="health-checking")
    doc = get(server, rid)
    assert doc["status"] == "rolled-back"
    me = by_device(doc)[canary]
    assert me["status"] == "rolled-back" and "nothing to revert to" in (me["detail"] or "")
    assert desired.model is None
    assert stable(server, name) is None
    assert newcomer(server, name, f"{name}-new").model is None  # no stable version yet


def test_deleting_the_blueprint_aborts_its_rollout(server: Server) -> None:
    name = "deleted"
    fleet = devices(server, name, 2)
    rid = apply(server, name, "1.0.0", policy(CANARY_THEN_ALL, min_soak_seconds=30))["rollout"]
    with server.client(server.admin) as c:
        assert c.delete(f"/api/v1/blueprints/{name}").status_code == 204
    doc = get(server, rid)
    assert doc["status"] == "aborted" and "deleted" in doc["history"][-1]["reason"]
    for d in fleet:  # nothing governs them any more
        assert d.checkin().model is None


# --- 2. gates and operator actions (SQLite) ---------------------------------------------------


def test_pause_on_failure_then_operator_actions(server: Server) -> None:
    name = "ops"
    fleet = devices(server, name, 4)
    establish(server, name, fleet)
    waves = [{"count": 1}, {"count": 2}, {"percent": 100}]
    rid = apply(server, name, "1.1.0", policy(waves, on_failure="pause"))["rollout"]
    [canary] = in_wave(get(server, rid), 0)
    first = next(d for d in fleet if d.device_id == canary)
    first.report(rid, "1.1.0", "failed", stage="health-checking")
    doc = get(server, rid)
    assert doc["status"] == "paused" and doc["wave"] == 0
    assert doc["wave_list"][0]["decision"]["verdict"] == "fail"
    assert doc["wave_list"][0]["outcome"] is None  # paused, not ended
    assert (
        doc["history"][-1]["to_status"] == "paused"
        and "wave 0 failed" in doc["history"][-1]["reason"]
    )
    m = first.checkin().model  # paused: nobody is reverted
    assert m is not None and (m.version, m.revert) == ("1.1.0", False)

    for action in ("pause", "start"):
        err = assert_envelope(act(server, rid, action), 409, "invalid_transition")
        assert "paused" in err["message"]
    # Resuming with the failure still there fails the gate again at once.
    r = act(server, rid, "resume", reason="try again")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "paused"
    assert [h["to_status"] for h in r.json()["history"][-2:]] == ["running", "paused"]
    assert r.json()["history"][-2]["reason"] == "resume by root: try again"

    err = assert_envelope(act(server, rid, "promote", wave=1), 409, "invalid_transition")
    assert "wave 1" in err["message"] and "wave 0" in err["message"]
    r = act(server, rid, "promote", wave=0)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["status"], doc["wave"]) == ("running", 1)
    assert doc["wave_list"][0]["outcome"] == "promoted"
    assert doc["wave_list"][0]["ended_by"] == "root"
    [second] = in_wave(doc, 1)
    # A promote with the wave seen before is stale now.
    assert_envelope(act(server, rid, "promote", wave=0), 409, "invalid_transition")

    r = act(server, rid, "pause")
    assert r.status_code == 200 and r.json()["status"] == "paused"
    r = act(server, rid, "resume")
    assert r.status_code == 200 and r.json()["status"] == "running"  # wave 1: waiting
    r = act(server, rid, "abort", reason="enough")
    assert r.status_code == 200 and r.json()["status"] == "aborted"
    doc = r.json()
    assert doc["wave_list"][1]["outcome"] == "aborted"
    for action in ("resume", "promote", "rollback", "abort", "pause"):
        assert_envelope(act(server, rid, action), 409, "invalid_transition")

    # Abort leaves moved devices on the target and the queued ones on what they ran.
    for d in fleet:
        m = d.checkin().model
        assert m is not None
        want = "1.1.0" if d.device_id in (canary, second) else "1.0.0"
        assert (d.device_id, m.version, m.revert) == (d.device_id, want, False)
    assert_consistent(fleet)


def test_manual_start_await_promote_and_operator_rollback(server: Server) -> None:
    name = "manual"
    fleet = devices(server, name, 3)
    establish(server, name, fleet)
    rid = apply(server, name, "1.1.0", policy(CANARY_THEN_ALL, auto_advance=False, start="manual"))[
        "rollout"
    ]
    doc = get(server, rid)
    assert (doc["status"], doc["wave"]) == ("created", None)
    assert doc["by_status"] == {"queued": 3}
    for d in fleet:
        m = d.checkin().model
        assert m is not None and (m.version, m.rollout_id) == ("1.0.0", None)
    assert_envelope(act(server, rid, "resume"), 409, "invalid_transition")
    assert_envelope(act(server, rid, "promote"), 409, "invalid_transition")

    r = act(server, rid, "start", reason="go")
    assert r.status_code == 200 and (r.json()["status"], r.json()["wave"]) == ("running", 0)
    [canary] = in_wave(r.json(), 0)
    first = next(d for d in fleet if d.device_id == canary)
    first.follow()
    doc = get(server, rid)
    assert doc["wave_list"][0]["decision"]["verdict"] == "pass"
    time.sleep(0.6)  # ticks come and go: the passed wave waits for a promote
    doc = get(server, rid)
    assert (doc["status"], doc["wave"]) == ("running", 0)
    assert doc["wave_list"][0]["outcome"] is None

    r = act(server, rid, "promote", wave=0)
    assert r.status_code == 200 and r.json()["wave"] == 1
    assert len(in_wave(r.json(), 1)) == 2
    others = [d for d in fleet if d is not first]
    others[0].follow()  # one of the two installs; the other has not reported yet
    r = act(server, rid, "rollback", reason="changed my mind")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "rolling-back" and doc["wave_list"][1]["outcome"] == "rolled-back"
    for d in fleet:  # every moved device is told to go back to 1.0.0
        m = d.checkin().model
        assert m is not None and (m.version, m.revert, m.rollout_id) == ("1.0.0", True, rid)
    first.follow()
    others[0].follow()
    assert get(server, rid)["status"] == "rolling-back"  # one still to report
    others[1].follow()
    doc = get(server, rid)
    assert doc["status"] == "rolled-back" and doc["by_status"] == {"rolled-back": 3}
    assert_consistent(fleet)


def test_timeout_takes_the_on_timeout_action(server: Server) -> None:
    name = "timeout"
    fleet = devices(server, name, 2)
    establish(server, name, fleet)
    rollout = policy(CANARY_THEN_ALL, timeout_seconds=1.0, on_timeout="rollback")
    rid = apply(server, name, "1.1.0", rollout)["rollout"]
    [canary] = in_wave(get(server, rid), 0)
    first = next(d for d in fleet if d.device_id == canary)
    first.report(rid, "1.1.0", "downloading")  # not final: never decides the wave
    doc = until(server, rid, lambda r: r["status"] != "running", timeout=10)
    assert doc["status"] == "rolling-back"
    wave0 = doc["wave_list"][0]
    assert wave0["outcome"] == "timed-out" and wave0["decision"]["verdict"] == "timeout"
    ev = results(wave0["decision"])
    assert ev["timeout"]["threshold"] == 1.0 and ev["timeout"]["observed"] >= 1.0
    assert ev["reported"]["status"] == "wait" and ev["reported"]["observed"] == 0
    assert "timed out" in doc["history"][-1]["reason"]
    m = first.checkin().model
    assert m is not None and (m.version, m.revert) == ("1.0.0", True)
    first.report(rid, "1.0.0", "rolled-back")
    assert get(server, rid)["status"] == "rolled-back"


def test_min_reported_and_min_success_rate_numbers(server: Server) -> None:
    name = "rates"
    fleet = devices(server, name, 4)
    rollout = policy(
        [{"percent": 100}],
        min_reported=0.75,
        min_success_rate=0.6,
        max_health_failure_rate=None,
    )
    rid = apply(server, name, "1.0.0", rollout)["rollout"]
    assert len(in_wave(get(server, rid), 0)) == 4

    fleet[0].report(rid, "1.0.0", "active")
    ev = results(get(server, rid)["wave_list"][0]["evaluation"])
    assert "health_failures" not in ev
    assert (ev["reported"]["status"], ev["reported"]["observed"]) == ("wait", 0.25)
    assert (ev["reported"]["threshold"], ev["reported"]["samples"]) == (0.75, 4)
    assert "1 of 4" in ev["reported"]["detail"] and "need 3" in ev["reported"]["detail"]
    assert (ev["success_rate"]["status"], ev["success_rate"]["observed"]) == ("pass", 1.0)

    fleet[1].report(rid, "1.0.0", "failed", stage="installing")
    doc = get(server, rid)
    ev = results(doc["wave_list"][0]["evaluation"])
    assert doc["status"] == "running"
    assert (ev["reported"]["status"], ev["reported"]["observed"]) == ("wait", 0.5)
    assert (ev["success_rate"]["status"], ev["success_rate"]["observed"]) == ("wait", 0.5)
    assert ev["success_rate"]["threshold"] == 0.6 and ev["success_rate"]["samples"] == 2

    fleet[2].report(rid, "1.0.0", "active")  # 3 of 4 reported, 2 of 3 active: both pass
    doc = get(server, rid)
    assert doc["status"] == "succeeded"
    ev = results(doc["wave_list"][0]["decision"])
    assert ev["reported"]["status"] == "pass" and ev["reported"]["observed"] == 0.75
    assert ev["success_rate"]["status"] == "pass"
    assert ev["success_rate"]["observed"] == pytest.approx(2 / 3)
    assert doc["by_status"] == {"active": 2, "failed": 1, "scheduled": 1}


# --- 3. auth ----------------------------------------------------------------------------------


def test_rollout_api_auth_and_404(server: Server) -> None:
    name = "auth"
    devices(server, name, 1)
    rid = apply(server, name, "1.0.0", policy([{"percent": 100}], min_soak_seconds=30))["rollout"]
    viewer = make_token(server, "viewer")
    with server.client(viewer) as c:
        listed = c.get("/api/v1/rollouts", params={"blueprint": name}).json()["data"]
        assert [r["id"] for r in listed] == [rid] and listed[0]["status"] == "running"
        assert c.get(f"/api/v1/rollouts/{rid}").json()["id"] == rid
        assert_envelope(c.post(f"/api/v1/rollouts/{rid}/pause", json={}), 403, "forbidden")
    assert_envelope(httpx.get(server.url + "/api/v1/rollouts"), 401, "unauthorized")
    assert_envelope(httpx.get(f"{server.url}/api/v1/rollouts/{rid}"), 401, "unauthorized")
    assert_envelope(httpx.post(f"{server.url}/api/v1/rollouts/{rid}/pause"), 401)
    with server.client(make_token(server, "operator")) as c:
        err = assert_envelope(c.get("/api/v1/rollouts/nope-1"), 404, "not_found")
        assert err["where"] == "rollout_id"
        assert_envelope(c.post("/api/v1/rollouts/nope-1/pause", json={}), 404, "not_found")
        assert c.post(f"/api/v1/rollouts/{rid}/dance", json={}).status_code == 422
        r = c.post(f"/api/v1/rollouts/{rid}/pause")  # no body at all
        assert r.status_code == 200, r.text
        assert r.json()["history"][-1]["actor"] == "t-operator"
        assert r.json()["history"][-1]["reason"] == "pause by t-operator"
    assert get(server, rid)["status"] == "paused"


# --- 4. late enrollment -----------------------------------------------------------------------


def test_late_enrollment_joins_the_running_rollout(server: Server) -> None:
    name = "late"
    fleet = devices(server, name, 2)
    rid = apply(server, name, "1.0.0", policy(CANARY_THEN_ALL, auto_advance=False))["rollout"]
    assert get(server, rid)["devices"] == 2

    [early] = devices(server, name, 1, prefix=f"{name}-w0")
    assert early.checkin().model is None  # queued: wave 0's one device is taken
    doc = get(server, rid)
    assert doc["devices"] == 3 and by_device(doc)[early.device_id]["status"] == "queued"
    assert len(in_wave(doc, 0)) == 1

    doc = act(server, rid, "promote", wave=0).json()
    assert doc["wave"] == 1 and len(in_wave(doc, 1)) == 2
    [later] = devices(server, name, 1, prefix=f"{name}-w1")
    m = later.checkin().model  # wave 1 is 100%: assigned on its first check-in
    assert m is not None and (m.version, m.rollout_id) == ("1.0.0", rid)
    doc = get(server, rid)
    assert by_device(doc)[later.device_id]["wave"] == 1
    assert [w["target"] for w in doc["wave_list"]] == [1, 4]
    for d in [*fleet, early, later]:
        d.follow()
    doc = get(server, rid)
    assert doc["status"] == "running"  # passed, but waits for a promote
    assert doc["wave_list"][1]["decision"]["verdict"] == "pass"
    assert act(server, rid, "promote").json()["status"] == "succeeded"


# --- 5. restart mid-rollout -------------------------------------------------------------------


class Proc:
    """A server process on a data dir that outlives it."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        with (self.data / "server.log").open("a") as log:
            self.proc = subprocess.Popen(
                [*CLI, "run", "--data", str(self.data), "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **TICK},
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "server did not start: " + (self.data / "server.log").read_text()
                )
            time.sleep(0.1)

    def stop(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=15)


SOAK = 15.0  # long enough for the first restart to come back mid-soak on a busy machine


def test_restart_mid_rollout_resumes_the_same_state(
    tmp_path: Path, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLMOPS_DB_URL", raising=False)  # SQLite in the data dir
    data = tmp_path / "server"
    data.mkdir()
    admin = cli_json("token", "create", "--data", data, "--role", "admin", "--name", "root")
    proc = Proc(data)
    proc.start()
    try:
        server = Server(proc.url, data, admin["token"])
        push_all(server, {"1.0.0": bundles["1.0.0"]})
        name = "restart"
        fleet = devices(server, name, 3)
        waves: list[dict[str, Any]] = [
            {"count": 1},
            {"percent": 100, "gates": {"min_soak_seconds": 0}},
        ]
        rollout = policy(waves, min_soak_seconds=SOAK)
        rid = apply(server, name, "1.0.0", rollout)["rollout"]
        before = get(server, rid)
        [canary] = in_wave(before, 0)
        first = next(d for d in fleet if d.device_id == canary)
        first.follow()
        for d in fleet:
            d.checkin()
        before = get(server, rid)
        assert by_device(before)[canary]["status"] == "active" and before["wave"] == 0

        checked: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            proc.stop(sig)
            proc.start()
            server.url = proc.url
            for d in fleet:
                d.server = server
            after = get(server, rid)
            for d in fleet:
                d.checkin()
            # the canary is told the same; the others too while the soak is still pending
            assert first.told[-1] == first.told[-2] == ("1.0.0", rid, False), first.told
            if time.time() - before["wave_list"][0]["started_at"] < SOAK - 1:
                checked.append(sig)
                assert after["wave"] == 0 and after["status"] == "running"
                assert after["device_list"] == before["device_list"]
                assert after["wave_list"][0]["started_at"] == before["wave_list"][0]["started_at"]
                for d in fleet:
                    assert d.told[-1] == d.told[-2], (sig, d.device_id, d.told)

        assert signal.SIGTERM in checked  # at least the first restart came back mid-soak
        doc = until(server, rid, lambda r: r["wave"] == 1, timeout=15)
        assert in_wave(doc, 0) == [canary]
        wave0 = doc["wave_list"][0]
        assert wave0["started_at"] == before["wave_list"][0]["started_at"]  # not restarted
        assert wave0["decision"]["verdict"] == "pass" and wave0["outcome"] == "passed"
        assert results(wave0["decision"])["soak"]["observed"] >= SOAK
        for d in fleet:
            d.follow()
        doc = until(server, rid, lambda r: r["status"] in FINAL)
        assert doc["status"] == "succeeded" and doc["by_status"] == {"active": 3}
        assert_consistent(fleet)
        assert [h["to_status"] for h in doc["history"]] == ["running", "succeeded"]
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)


# --- 6. superseding applies -------------------------------------------------------------------


def test_superseding_apply_aborts_and_stable_apply_rolls_back(server: Server) -> None:
    name = "supersede"
    fleet = devices(server, name, 3)
    establish(server, name, fleet)
    slow = policy(CANARY_THEN_ALL, min_soak_seconds=30)
    old = apply(server, name, "1.1.0", slow)["rollout"]
    [first_canary] = in_wave(get(server, old), 0)

    new = apply(server, name, "1.2.0", slow)["rollout"]
    assert new and new != old
    gone = get(server, old)
    assert gone["status"] == "aborted" and "1.2.0" in gone["history"][-1]["reason"]
    doc = get(server, new)
    assert (doc["status"], doc["target_version"], doc["wave"]) == ("running", "1.2.0", 0)
    [canary] = in_wave(doc, 0)
    with server.client(server.admin) as c:
        listed = c.get("/api/v1/rollouts", params={"blueprint": name}).json()["data"]
        assert [r["id"] for r in listed[:2]] == [new, old]
        assert c.get("/api/v1/rollouts", params={"status": "aborted"}).json()["data"]
    for d in fleet:
        m = d.checkin().model
        assert m is not None
        if d.device_id == canary:
            assert (m.version, m.rollout_id) == ("1.2.0", new)
        else:  # the old rollout's canary was never told anything else than 1.0.0 by now
            assert m.version == "1.0.0" and m.rollout_id is None, (d.device_id, first_canary)
    moved = next(d for d in fleet if d.device_id == canary)
    moved.follow()

    again = apply(server, name, "1.0.0", slow)  # back to the stable version: roll back
    assert again["rollout"] is None
    doc = get(server, new)
    assert doc["status"] == "rolling-back" and "1.0.0" in doc["history"][-1]["reason"]
    m = moved.checkin().model
    assert m is not None and (m.version, m.revert, m.rollout_id) == ("1.0.0", True, new)
    moved.follow()
    assert get(server, new)["status"] == "rolled-back"
    with server.client(server.admin) as c:
        listed = c.get("/api/v1/rollouts", params={"blueprint": name}).json()["data"]
    assert len(listed) == 3  # establish, 1.1.0 (aborted), 1.2.0 (rolled back): no new one
    assert stable(server, name) == "1.0.0"
    assert newcomer(server, name, f"{name}-new").model.version == "1.0.0"  # type: ignore[union-attr]


# --- 7. the CLI -------------------------------------------------------------------------------


def rollout_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLMOPS_TOKEN", "SLMOPS_SERVER")}
    return subprocess.run(
        [*MAIN, "rollout", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env | {"SLMOPS_SERVER": server.url, "SLMOPS_TOKEN": server.admin},
        check=False,
    )


def test_cli_list_get_pause_wait(server: Server) -> None:
    name = "cli"
    fleet = devices(server, name, 2)
    done = establish(server, name, fleet)
    res = rollout_cli(server, "wait", done, "--timeout", "10")
    assert res.returncode == 0, res.stderr + res.stdout
    assert json.loads(res.stdout)["status"] == "succeeded"

    rid = apply(server, name, "1.1.0", policy(CANARY_THEN_ALL, min_soak_seconds=30))["rollout"]
    res = rollout_cli(server, "list", "--blueprint", name)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)["data"]
    assert [(r["id"], r["status"]) for r in listed] == [(rid, "running"), (done, "succeeded")]
    res = rollout_cli(server, "get", rid)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["id"] == rid and got["target_version"] == "1.1.0" and len(got["device_list"]) == 2

    res = rollout_cli(server, "pause", rid, "--reason", "look first", "--wave", "1")
    assert res.returncode == 2 and "at wave 0" in json.loads(res.stdout)["message"]  # 0 = canary
    res = rollout_cli(server, "pause", rid, "--reason", "look first", "--wave", "0")
    assert res.returncode == 0, res.stderr + res.stdout
    paused = json.loads(res.stdout)
    assert paused["status"] == "paused"
    assert paused["history"][-1]["reason"] == "pause by root: look first"
    res = rollout_cli(server, "pause", rid)  # not allowed twice
    assert res.returncode == 2, res.stderr + res.stdout
    err = json.loads(res.stdout)
    assert "HTTP 409" in err["message"] and "paused" in err["message"]

    res = rollout_cli(server, "rollback", rid)
    assert res.returncode == 0 and json.loads(res.stdout)["status"] == "rolling-back"
    [canary] = in_wave(get(server, rid), 0)
    next(d for d in fleet if d.device_id == canary).follow()
    assert get(server, rid)["status"] == "rolled-back"
    res = rollout_cli(server, "wait", rid, "--timeout", "10")
    assert res.returncode == 1, res.stderr + res.stdout
    err = json.loads(res.stdout)
    assert "rolled-back" in err["message"] and rid in err["where"]


# --- the ticker: one bad row does not stop the others ---------------------------------------


def test_a_rollout_that_cannot_be_ticked_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLMOPS_DB_URL", raising=False)  # SQLite in tmp_path
    db = open_database(load_settings(data_dir=tmp_path))
    now = time.time()
    good = create_rollout("b-1", "1.0.0", now=now)
    match = MatchedDevice(device_id="x", hardware_class="pi", current_version=None)
    good, _ = step(good, DevicesMatched(devices=[match]), now)
    good, _ = step(good, OperatorCommand(action=OperatorAction.START, actor="t"), now)
    assert good.status.value == "running"  # waits for x to report (and a 600 s soak)
    with db.sessions() as session:
        for rid, text in (("a-1", "{not a rollout"), ("b-1", good.to_json())):
            session.add(Rollout(id=rid, blueprint=rid[0], state_json=text, status="running", seq=1))
        session.commit()
    try:
        assert tick_all(db, BlobStore(tmp_path), poll_seconds=60) == 1
        with db.sessions() as session:
            row = session.get(Rollout, "b-1")
            assert row is not None and row.revision == 1  # ticked: a fresh evaluation stored
            bad = session.get(Rollout, "a-1")
            assert bad is not None and bad.revision == 0
    finally:
        db.dispose()
