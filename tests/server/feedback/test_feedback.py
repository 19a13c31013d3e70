"""The feedback loop end to end: a real `slmops server run` (SQLite; the pause flow also on
PostgreSQL), feedback rules applied over /api/v1/feedback-rules, alerts inserted straight into
the server's database (the seam: drift detection is tested in test_telemetry.py), devices
simulated over the device API, and a worker's side of improvement jobs (claim, push, result).

The server ticks every 0.2 s (SLMOPS_ROLLOUT_TICK_SECONDS), and every tick runs the rules over
new alerts. Every test uses its own rule set, matching only its own alert ``statistic``, its own
blueprint and device fleet; the pause test its own version (1.1.0), so rules never cross tests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from factories.blueprints import MODEL, push_version
from factories.rollouts import (
    CANARY_THEN_ALL,
    TICK,
    act,
    apply,
    build_versions,
    devices,
    establish,
    get,
    policy,
    postgres_server,
    push_all,
)
from factories.server import Server, _server, assert_envelope, make_token
from helpers import free_port
from slmops.server.db.session import open_database
from slmops.server.settings import load_settings
from slmops.server.telemetry.tables import AlertRow

LOOPBACK_HOOKS = {"SLMOPS_WEBHOOK_ALLOW": '["127.0.0.1"]'}  # the receivers below are on loopback
VERSIONS = ("1.0.0", "1.0.1", "1.1.0")  # 1.0.1 taken: the next free patch after 1.0.0 is 1.0.2
DB_URLS: dict[str, str | None] = {}  # server url -> its database (None: SQLite in its data dir)


# --- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_versions(tmp_path_factory.mktemp("fb-bundles"), VERSIONS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Iterator[Server]:
    for srv in _server(tmp_path_factory, env=TICK | LOOPBACK_HOOKS):
        DB_URLS[srv.url] = None
        push_all(srv, bundles)
        yield srv


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def any_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[Server]:
    if request.param == "sqlite":
        yield request.getfixturevalue("server")
        return
    for srv, url in postgres_server(tmp_path_factory, bundles):
        DB_URLS[srv.url] = url
        yield srv


# --- helpers ----------------------------------------------------------------------------------


def raise_alert(server: Server, statistic: str, **fields: Any) -> int:
    """Insert an alert as the drift check would; returns its id."""
    values: dict[str, Any] = {
        "kind": "drift",
        "model": MODEL,
        "version": "1.0.0",
        "profile": "pi",
        "statistic": statistic,
        "value": 0.4,
        "threshold": 0.2,
        "details": {"test": True},
    }
    values |= fields
    db = open_database(load_settings(data_dir=server.data, db_url=DB_URLS[server.url]))
    try:
        with db.sessions() as session:
            row = AlertRow(**values)
            session.add(row)
            session.commit()
            return int(row.id)
    finally:
        db.dispose()


def rules_doc(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "slmops/v1",
        "kind": "FeedbackRules",
        "metadata": {"name": name},
        "spec": {"rules": rules},
    }


def put_rules(server: Server, name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    with server.client(server.admin) as c:
        r = c.put(f"/api/v1/feedback-rules/{name}", json=rules_doc(name, rules))
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def actions_for(server: Server, alert_id: int) -> list[dict[str, Any]]:
    with server.client(server.admin) as c:
        r = c.get("/api/v1/alert-actions", params={"alert_id": alert_id})
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["data"]
    return sorted(rows, key=lambda a: a["created_at"])


def wait_for(what: Callable[[], Any], timeout: float = 15, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting {message}"
        time.sleep(0.1)


def jobs(server: Server) -> list[dict[str, Any]]:
    with server.client(server.admin) as c:
        r = c.get("/api/v1/jobs")
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def some_ticks() -> None:
    """Several ticks of the server's loop (0.2 s each): room for a repeated action to show."""
    time.sleep(1.2)


# --- 1. rule sets: apply, refuse, list, delete ------------------------------------------------


def test_rules_apply_validate_list_delete(server: Server) -> None:
    rules: list[dict[str, Any]] = [
        {
            "name": "all-three",
            "match": {"kind": "drift", "statistic": "fb-never-raised", "min_value": 0.3},
            "actions": [
                {"pause": {"reason": "drift"}},
                {"notify": {"url": "http://127.0.0.1:9/hook"}},
                {"improve": {"direction": "higher-precision", "start": "manual"}},
            ],
        }
    ]
    first = put_rules(server, "fb-rules", rules)
    assert (first["changed"], first["generation"], first["name"]) == (True, 1, "fb-rules")
    spec = first["document"]["spec"]
    assert spec["rules"][0]["actions"][1]["notify"]["timeout_seconds"] == 5.0  # the default
    assert spec["rules"][0]["match"] == {
        "kind": "drift",
        "statistic": "fb-never-raised",
        "min_value": 0.3,
    }
    again = put_rules(server, "fb-rules", rules)
    assert (again["changed"], again["generation"]) == (False, 1)
    rules[0]["actions"] = rules[0]["actions"][:1]
    changed = put_rules(server, "fb-rules", rules)
    assert (changed["changed"], changed["generation"]) == (True, 2)
    assert len(changed["document"]["spec"]["rules"][0]["actions"]) == 1

    def refused(doc: dict[str, Any], name: str = "fb-bad") -> dict[str, Any]:
        with server.client(server.admin) as c:
            return assert_envelope(
                c.put(f"/api/v1/feedback-rules/{name}", json=doc), 422, "invalid_request"
            )

    two = [{"name": "r", "actions": [{"pause": {}, "notify": {"url": "http://x/"}}]}]
    err = refused(rules_doc("fb-bad", two))
    assert err["where"].startswith("body.spec.rules.0.actions.0"), err
    assert "exactly one" in err["message"]

    unknown = [{"name": "r", "match": {"statistc": "x"}, "actions": [{"pause": {}}]}]
    err = refused(rules_doc("fb-bad", unknown))
    assert err["where"] == "body.spec.rules.0.match.statistc", err

    dup = [{"name": "r", "actions": [{"pause": {}}]}, {"name": "r", "actions": [{"pause": {}}]}]
    err = refused(rules_doc("fb-bad", dup))
    assert err["where"] == "body.spec", err
    assert "repeated: r" in err["message"]

    bad_direction = [{"name": "r", "actions": [{"improve": {"direction": "bigger"}}]}]
    err = refused(rules_doc("fb-bad", bad_direction))
    assert err["where"] == "body.spec.rules.0.actions.0.improve.direction", err

    err = refused(rules_doc("fb-other", rules), name="fb-bad")
    assert err["where"] == "body.metadata.name"

    viewer = make_token(server, "viewer")
    with server.client(viewer) as c:
        r = c.put("/api/v1/feedback-rules/fb-rules", json=rules_doc("fb-rules", rules))
        assert_envelope(r, 403, "forbidden")
        assert_envelope(c.delete("/api/v1/feedback-rules/fb-rules"), 403, "forbidden")
        listed = c.get("/api/v1/feedback-rules")
        assert listed.status_code == 200
        mine = [s for s in listed.json() if s["name"] == "fb-rules"]
        assert len(mine) == 1 and mine[0]["generation"] == 2
        assert mine[0]["document"]["kind"] == "FeedbackRules"
        assert not [s for s in listed.json() if s["name"] == "fb-bad"]  # refused: not stored

    with server.client(make_token(server, "operator")) as c:
        assert c.delete("/api/v1/feedback-rules/fb-rules").status_code == 204
        assert not [s for s in c.get("/api/v1/feedback-rules").json() if s["name"] == "fb-rules"]
        err = assert_envelope(c.delete("/api/v1/feedback-rules/fb-rules"), 404, "not_found")
        assert err["where"] == "name"


# --- 2. pause (SQLite and PostgreSQL) ---------------------------------------------------------


def test_pause_rule_pauses_the_running_rollout_once(any_server: Server) -> None:
    server, name = any_server, "fb-pause"
    devices(server, name, 2)
    put_rules(
        server, name, [{"name": "stop", "match": {"statistic": name}, "actions": [{"pause": {}}]}]
    )
    # a long soak on the canary wave: the rollout is running when the alert comes
    rid = apply(
        server, name, "1.1.0", policy(CANARY_THEN_ALL, min_soak_seconds=120, timeout_seconds=600)
    )["rollout"]
    assert rid and get(server, rid)["status"] == "running"

    alert = raise_alert(server, name, version="1.1.0")
    doc = wait_for(
        lambda: (d := get(server, rid))["status"] == "paused" and d, message="for the pause"
    )
    last = doc["history"][-1]
    assert (last["from_status"], last["to_status"]) == ("running", "paused")
    assert last["actor"] == f"rule:{name}/stop"
    assert f"alert {alert}" in last["reason"] and "1.1.0" in last["reason"]

    some_ticks()
    [row] = actions_for(server, alert)
    assert (row["rule"], row["action"], row["ok"], row["job_id"]) == (
        f"{name}/stop",
        "pause",
        True,
        None,
    )
    assert row["detail"] == f"paused {rid}"
    doc = get(server, rid)
    assert doc["status"] == "paused"
    assert [h["to_status"] for h in doc["history"]] == ["running", "paused"]

    # a second alert on the paused version finds nothing running, and says so
    again = raise_alert(server, name, version="1.1.0")
    [row2] = wait_for(lambda: actions_for(server, again), message="for the second alert")
    assert row2["action"] == "pause" and row2["detail"] == "no running rollout of 1.1.0"
    assert len(get(server, rid)["history"]) == 2
    assert act(server, rid, "resume").status_code == 200
    some_ticks()
    assert get(server, rid)["status"] == "running"  # handled alerts never act again
    assert len(actions_for(server, alert)) == 1


# --- 3. notify --------------------------------------------------------------------------------


class Hooks:
    """A webhook receiver on 127.0.0.1, in a thread; keeps every POST body, and answers after
    ``delay`` seconds (``arrived`` is set as a request comes in)."""

    def __init__(self, delay: float = 0.0) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        arrived = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append((self.path, json.loads(self.rfile.read(length))))
                arrived.set()
                time.sleep(delay)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received, self.arrived = received, arrived
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.close()


def test_notify_posts_the_alert_once_and_records_failures(server: Server, hooks: Hooks) -> None:
    name = "fb-notify"
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    actions = [
        {"notify": {"url": dead, "timeout_seconds": 2}},
        {"notify": {"url": hooks.url + "/hooks/slmops"}},
    ]
    put_rules(server, name, [{"name": "hook", "match": {"statistic": name}, "actions": actions}])
    alert = raise_alert(server, name, value=0.75)

    def done() -> list[dict[str, Any]] | None:  # rows say "sending" while the POST is out
        a = actions_for(server, alert)
        return a if len(a) == 2 and not any(r["detail"].endswith("sending") for r in a) else None

    rows = wait_for(done, message="2 finished rows")
    by_detail = {r["ok"]: r for r in rows}
    assert set(by_detail) == {True, False}
    assert by_detail[False]["action"] == "notify" and "unreachable" in by_detail[False]["detail"]
    assert dead in by_detail[False]["detail"]
    assert by_detail[True]["detail"] == f"webhook {hooks.url}/hooks/slmops answered 204"
    assert all(r["rule"] == f"{name}/hook" for r in rows)

    some_ticks()
    assert len(actions_for(server, alert)) == 2
    [(path, body)] = hooks.received
    assert path == "/hooks/slmops"
    assert body["source"] == "slmops" and body["rule"] == f"{name}/hook"
    sent = body["alert"]
    assert (sent["id"], sent["statistic"], sent["value"], sent["threshold"]) == (
        alert,
        name,
        0.75,
        0.2,
    )
    assert (sent["model"], sent["version"], sent["profile"]) == (MODEL, "1.0.0", "pi")
    assert sent["details"] == {"test": True}


def test_a_slow_webhook_does_not_hold_the_database(server: Server) -> None:
    """While the ticker waits on a webhook, device check-ins (which write) go on at once."""
    name = "fb-slow-hook"
    [dev] = devices(server, name, 1)
    hooks = Hooks(delay=5.0)
    try:
        notify = {"notify": {"url": hooks.url + "/slow", "timeout_seconds": 10}}
        put_rules(
            server, name, [{"name": "slow", "match": {"statistic": name}, "actions": [notify]}]
        )
        alert = raise_alert(server, name)
        assert hooks.arrived.wait(15)
        began = time.monotonic()
        dev.checkin()
        assert time.monotonic() - began < 2.5  # not the webhook's 5 s
        # the ticker goes on with other alerts meanwhile: webhooks have their own worker
        pause = {"name": "next", "match": {"statistic": name + "-2"}, "actions": [{"pause": {}}]}
        put_rules(server, name + "-2", [pause])
        second = raise_alert(server, name + "-2")
        wait_for(lambda: actions_for(server, second), timeout=3, message="the next alert")
        [out] = actions_for(server, alert)  # still out: the webhook answers after 5 s
        assert out["detail"].endswith("sending") and out["ok"] is False
        [row] = wait_for(
            lambda: [a for a in actions_for(server, alert) if "answered" in a["detail"]],
            message="for the webhook's answer",
        )
        assert row["ok"] is True and row["detail"].endswith("answered 204")
    finally:
        hooks.close()


def test_a_failing_action_is_recorded_and_the_next_ones_still_run(
    tmp_path: Path, hooks: Hooks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: a pause that fails after committing (as run_event does) is recorded on its
    claimed row, and the notify after it still runs."""
    from slmops.server.context import Context
    from slmops.server.feedback import engine
    from slmops.server.feedback.tables import AlertAction, FeedbackRulesRow
    from slmops.server.registry.store import BlobStore

    def broken_pause(session: Any, *args: Any) -> str:
        session.commit()
        raise RuntimeError("rollout store on fire")

    monkeypatch.setattr(engine, "_pause", broken_pause)
    engine.webhooks.configure(["127.0.0.1"])
    db = open_database(load_settings(data_dir=tmp_path))
    try:
        with db.sessions() as session:
            actions = [{"pause": {}}, {"notify": {"url": hooks.url + "/after"}}]
            spec = {"rules": [{"name": "both", "actions": actions}]}
            session.add(FeedbackRulesRow(name="fb-fail", spec=spec))
            session.add(AlertRow(kind="drift", statistic="x", value=1.0, threshold=0.5))
            session.commit()
            assert engine.process_alerts(session, Context(BlobStore(tmp_path), 60)) == 2
            assert engine.process_alerts(session, Context(BlobStore(tmp_path), 60)) == 0
            assert engine.webhooks.wait_idle(30)  # the webhook worker recorded its outcome
            session.expire_all()
            rows = session.scalars(select(AlertAction).order_by(AlertAction.action_index)).all()
            assert [(r.action, r.ok) for r in rows] == [("pause", False), ("notify", True)]
            assert rows[0].detail == "RuntimeError: rollout store on fire"
        assert [path for path, _ in hooks.received] == ["/after"]
    finally:
        engine.webhooks.configure([])
        db.dispose()


# --- 4. improve: a job, claimed, rejected; another proposed as a manual rollout --------------


def test_improve_queues_a_job_that_a_worker_turns_into_a_rollout(
    server: Server, tmp_path: Path
) -> None:
    name = "fb-improve"
    fleet = devices(server, name, 2)
    establish(server, name, fleet)  # both run 1.0.0 (q8), profile pi, under blueprint fb-improve
    improve = {"improve": {"direction": "higher-precision", "start": "manual"}}
    rule = {"name": "better", "match": {"statistic": name}, "actions": [improve]}
    put_rules(server, name, [rule])
    operator = make_token(server, "operator")

    first = raise_alert(server, name)
    [job] = wait_for(
        lambda: [j for j in jobs(server) if j["alert_id"] == first], message="for the job"
    )
    assert job["status"] == "queued" and job["worker"] == "" and job["new_version"] == ""
    assert (job["blueprint"], job["model"], job["version"], job["variant"], job["profile"]) == (
        name,
        MODEL,
        "1.0.0",
        "q8",
        "pi",
    )
    assert (job["direction"], job["start"], job["rule"]) == (
        "higher-precision",
        "manual",
        f"{name}/better",
    )
    [row] = actions_for(server, first)
    assert (row["action"], row["ok"], row["job_id"]) == ("improve", True, job["id"])
    assert row["detail"] == f"improvement job {job['id']} queued"

    with server.client(operator) as c:
        claimed = c.post("/api/v1/jobs/claim", json={"worker": "w1"})
        assert claimed.status_code == 200, claimed.text
        got = claimed.json()
        assert (got["id"], got["status"], got["worker"]) == (job["id"], "running", "w1")
        assert got["new_version"] == "1.0.2"  # 1.0.1 is in the registry already
        assert c.post("/api/v1/jobs/claim", json={"worker": "w2"}).status_code == 204
        assert c.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "running"

    # a second job, claimed while the first still runs, must not be promised the same version
    second = raise_alert(server, name)
    [job2] = wait_for(
        lambda: [j for j in jobs(server) if j["alert_id"] == second], message="for job 2"
    )
    with server.client(operator) as c:
        got = c.post("/api/v1/jobs/claim", json={"worker": "w2"}).json()
        assert (got["id"], got["worker"], got["new_version"]) == (job2["id"], "w2", "1.0.3")

        bad = {"ok": False, "detail": "no candidate beat the gate", "candidate": {"q": 0.5}}
        r = c.post(f"/api/v1/jobs/{job['id']}/result", json=bad)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "rejected"
        assert r.json()["result"] == {"detail": bad["detail"], "candidate": {"q": 0.5}}
        assert_envelope(c.post(f"/api/v1/jobs/{job['id']}/result", json=bad), 409, "conflict")
        assert_envelope(c.get("/api/v1/jobs/999999"), 404, "not_found")

        missing = {"ok": True, "new_version": "1.0.9", "detail": "passed"}
        err = assert_envelope(c.post(f"/api/v1/jobs/{job2['id']}/result", json=missing), 422)
        assert err["where"] == "new_version" and "1.0.9" in err["message"]
        unpushed = c.post(f"/api/v1/jobs/{job2['id']}/result", json={"ok": True})
        assert_envelope(unpushed, 422)  # the claimed 1.0.3 is not pushed yet either
        left = c.get(f"/api/v1/jobs/{job2['id']}").json()
        assert (left["status"], left["result"]) == ("running", {})
        model = c.get(f"/api/v1/blueprints/{name}").json()["document"]["spec"]["model"]
        assert (model["name"], model["version"]) == (MODEL, "1.0.0")
    with server.client(make_token(server, "viewer")) as c:
        assert_envelope(c.post("/api/v1/jobs/claim", json={"worker": "v"}), 403, "forbidden")

    push_version(server, tmp_path / "candidate", "1.0.3")
    with server.client(operator) as c:
        before = c.get(f"/api/v1/blueprints/{name}").json()
        ok = {"ok": True, "new_version": "1.0.3", "detail": "passed", "candidate": {"q": 0.9}}
        r = c.post(f"/api/v1/jobs/{job2['id']}/result", json=ok)
        assert r.status_code == 200, r.text
        done = r.json()
        assert done["status"] == "proposed" and done["new_version"] == "1.0.3"
        rid = done["rollout_id"]
        assert rid == f"{name}-2"
        assert c.get(f"/api/v1/jobs/{job2['id']}").json()["rollout_id"] == rid

        bp = c.get(f"/api/v1/blueprints/{name}").json()
        assert bp["generation"] == before["generation"] + 1
        spec = bp["document"]["spec"]
        assert spec["model"]["version"] == "1.0.3" and spec["model"].get("channel") is None
        assert spec["rollout"]["start"] == "manual"
        assert spec["rollout"]["waves"] == before["document"]["spec"]["rollout"]["waves"]
        assert bp["stable_version"] == "1.0.0"

    doc = get(server, rid)
    assert (doc["status"], doc["target_version"], doc["devices"]) == ("created", "1.0.3", 2)
    assert all(d["from_version"] == "1.0.0" for d in doc["device_list"])
    for d in fleet:  # nothing moves before an operator starts it
        m = d.checkin().model
        assert m is not None and (m.version, m.rollout_id) == ("1.0.0", None)
    started = act(server, rid, "start")
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "running"
    told = [d.checkin().model for d in fleet]
    assert any(m is not None and (m.version, m.rollout_id) == ("1.0.3", rid) for m in told)
    assert [j["status"] for j in jobs(server) if j["alert_id"] in (first, second)] == [
        "proposed",
        "rejected",
    ]


def test_a_job_for_a_version_without_semver_fails_instead_of_blocking_the_queue(
    server: Server,
) -> None:
    name = "fb-nightly"
    [dev] = devices(server, name, 1)
    apply(server, name, "1.0.0", policy([{"percent": 100}], start="manual"))
    dev.active = {
        "name": MODEL,
        "version": "nightly",
        "variant": "q4",
        "digest": "sha256:" + "0" * 64,
    }
    dev.checkin()
    improve = {"improve": {"direction": "smaller"}}
    rule = {"name": "smaller", "match": {"statistic": name}, "actions": [improve]}
    put_rules(server, name, [rule])
    alert = raise_alert(server, name, version="nightly")
    [job] = wait_for(lambda: [j for j in jobs(server) if j["alert_id"] == alert], message="job")
    assert (job["variant"], job["blueprint"], job["start"]) == ("q4", name, "manual")
    with server.client(make_token(server, "operator")) as c:
        assert c.post("/api/v1/jobs/claim", json={"worker": "w"}).status_code == 204
        failed = c.get(f"/api/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and "nightly" in failed["result"]["error"]


# --- 5. no rule matches -----------------------------------------------------------------------


def test_unmatched_alert_is_marked_and_nothing_happens(server: Server) -> None:
    alert = raise_alert(server, "fb-nobody-matches", version="9.9.9")
    [row] = wait_for(lambda: actions_for(server, alert), message="for the none row")
    assert (row["rule"], row["action"], row["ok"], row["job_id"]) == ("", "none", True, None)
    assert row["detail"] == "no rule matches"
    some_ticks()
    assert len(actions_for(server, alert)) == 1
    assert not [j for j in jobs(server) if j["alert_id"] == alert]
