"""Rollouts end to end over a rollout's life: late enrollment, a server restart mid-rollout,
superseding applies, the `slmops rollout` CLI and a tick that fails for one row.

A real `slmops server run`, real bundles pushed to its registry, devices simulated over the
device API (enroll, check-in with action statuses), operators over /api/v1/rollouts and
`slmops rollout`.

The server ticks rollouts every 0.2 s (SLMOPS_ROLLOUT_TICK_SECONDS) so soak times and timeouts
of a second or two decide waves within the test. Every test uses its own blueprint and selector.
The servers and bundles are module fixtures in this folder's conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories.rollouts import (
    CANARY_THEN_ALL,
    FINAL,
    MAIN,
    TICK,
    act,
    apply,
    assert_consistent,
    by_device,
    devices,
    establish,
    get,
    in_wave,
    newcomer,
    policy,
    push_all,
    results,
    stable,
    until,
)
from factories.server import (
    CLI,
    Server,
    cli_json,
)
from helpers import free_port
from slmops.server.db.session import open_database
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts.machine import (
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    create_rollout,
    step,
)
from slmops.server.rollouts.service import tick_all
from slmops.server.rollouts.tables import Rollout
from slmops.server.settings import load_settings

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
