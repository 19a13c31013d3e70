"""Rollouts end to end, the core flows: canary then the rest then stable, a health-check failure
rolling back, nothing to roll back to, a deleted blueprint (SQLite and PostgreSQL for the first
two).

A real `slmops server run`, real bundles pushed to its registry, devices simulated over the
device API (enroll, check-in with action statuses), operators over /api/v1/rollouts and
`slmops rollout`.

The server ticks rollouts every 0.2 s (SLMOPS_ROLLOUT_TICK_SECONDS) so soak times and timeouts
of a second or two decide waves within the test. Every test uses its own blueprint and selector.
The servers and bundles are module fixtures in this folder's conftest.py.
"""

from __future__ import annotations

from typing import Any

from factories.rollouts import (
    CANARY_THEN_ALL,
    FINAL,
    apply,
    assert_consistent,
    by_device,
    devices,
    establish,
    get,
    in_wave,
    newcomer,
    policy,
    results,
    stable,
    until,
)
from factories.server import (
    Server,
)


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
