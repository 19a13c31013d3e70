"""Rollouts end to end, gates and operator actions: pause on failure, manual start/await/promote,
timeouts, min_reported and min_success_rate, and the API's auth.

A real `slmops server run`, real bundles pushed to its registry, devices simulated over the
device API (enroll, check-in with action statuses), operators over /api/v1/rollouts and
`slmops rollout`.

The server ticks rollouts every 0.2 s (SLMOPS_ROLLOUT_TICK_SECONDS) so soak times and timeouts
of a second or two decide waves within the test. Every test uses its own blueprint and selector.
The servers and bundles are module fixtures in this folder's conftest.py.
"""

from __future__ import annotations

import time

import httpx
import pytest

from factories.rollouts import (
    CANARY_THEN_ALL,
    act,
    apply,
    assert_consistent,
    devices,
    establish,
    get,
    in_wave,
    policy,
    results,
    until,
)
from factories.server import (
    Server,
    assert_envelope,
    make_token,
)

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
