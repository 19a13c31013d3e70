"""A device changes version only through a rollout's waves (issue 12), on a real server.

The bug this pins: a rollout took a device's version from its last check-in, not from the
``active`` action report the server had already received. Applying version B right after a
rollout to A succeeded (within one poll) then found the device "already on B" (its last check-in
said so), skipped it, ended at once as succeeded, and the device moved to B through the
blueprint's stable version with ``rollout_id: null``, outside every wave and gate. And a rollout
whose devices were all unplaceable ended as ``succeeded: nothing to move: no device matched``.

Devices are simulated over the device API of a real `slmops server run` (SQLite): check-ins
carry what the device runs, installs are reported through ``/device/v1/actions`` as the agent
does, so the server hears of an install before the next check-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from factories.blueprints import FITS, MODEL, TOO_SMALL
from factories.rollouts import build_versions, push_all
from factories.server import Server, _server, credential, enrollment_token, inventory
from slmops.protocol.device import DesiredState

TICK = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"}
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
ONE_WAVE = {
    "waves": [{"percent": 100}],
    "gates": {"min_soak_seconds": 0, "timeout_seconds": 60, "min_reported": 1},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    bundles = build_versions(tmp_path_factory.mktemp("bundles"), VERSIONS)
    for srv in _server(tmp_path_factory, env=TICK):
        push_all(srv, bundles)
        yield srv


@dataclass
class Agent:
    """A device as the agent behaves: checks in with what it runs; installs what it is told and
    posts the final state to ``/device/v1/actions`` at once (before its next check-in)."""

    server: Server
    device_id: str
    cred: str
    inv: dict[str, Any] = field(default_factory=lambda: dict(FITS))
    running: str | None = None
    told: DesiredState | None = None

    def active(self) -> dict[str, Any] | None:
        if self.running is None:
            return None
        return {"name": MODEL, "version": self.running, "variant": "q8", "digest": _digest()}

    def checkin(self) -> DesiredState:
        body = {"inventory": inventory(**self.inv), "active": self.active()}
        r = httpx.post(
            self.server.url + "/device/v1/checkin",
            json=body,
            headers={"Authorization": f"Bearer {self.cred}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        self.told = DesiredState.model_validate(r.json())
        return self.told

    def install(self) -> bool:
        """Carry out the last desired state; False when there was nothing to do."""
        m = self.told.model if self.told else None
        if m is None or m.version == self.running:
            return False
        self.running = m.version
        state = "rolled-back" if m.revert else "active"
        action = {"rollout_id": m.rollout_id, "version": m.version, "state": state}
        if m.rollout_id is not None:  # the agent posts rollout progress at once
            r = httpx.post(
                self.server.url + "/device/v1/actions",
                json={"actions": [action]},
                headers={"Authorization": f"Bearer {self.cred}"},
                timeout=10,
            )
            assert r.status_code == 204, r.text
        return True


def _digest() -> str:
    return "sha256:" + "0" * 64


def fleet(server: Server, name: str, n: int, **inv: Any) -> list[Agent]:
    token = enrollment_token(server, {"fleet": name})
    out = []
    for i in range(n):
        device_id = f"{name}-{i}"
        cred = credential(server, token, device_id, **(inv or FITS))
        out.append(Agent(server, device_id, cred, dict(inv or FITS)))
    return out


def apply(server: Server, name: str, version: str) -> str | None:
    doc = {
        "apiVersion": "slmops/v1",
        "kind": "Blueprint",
        "metadata": {"name": name},
        "spec": {
            "selector": {"fleet": name},
            "model": {"name": MODEL, "version": version},
            "rollout": ONE_WAVE,
        },
    }
    with server.client(server.admin) as c:
        r = c.put(f"/api/v1/blueprints/{name}", json=doc)
    assert r.status_code == 200, r.text
    rid: str | None = r.json()["rollout"]
    return rid


def rollout(server: Server, rollout_id: str) -> dict[str, Any]:
    with server.client(server.admin) as c:
        r = c.get(f"/api/v1/rollouts/{rollout_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_apply_right_after_a_rollout_moves_the_device_through_the_new_rollout(
    server: Server,
) -> None:
    """The reproduction from issue 12: the device is on A by its action report while its last
    check-in still says B; applying B must move it in B's rollout, not skip it."""
    name = "race"
    (dev,) = fleet(server, name, 1)
    dev.checkin()
    first = apply(server, name, "1.0.0")
    assert first
    dev.checkin()
    assert dev.install()  # 1.0.0, reported; then a check-in says so
    dev.checkin()
    assert rollout(server, first)["status"] == "succeeded"

    to_a = apply(server, name, "1.1.0")
    assert to_a
    dev.checkin()
    assert dev.told and dev.told.model and dev.told.model.rollout_id == to_a
    assert dev.install()  # runs 1.1.0 and said so on /actions; no check-in since
    assert rollout(server, to_a)["status"] == "succeeded"

    back = apply(server, name, "1.0.0")  # within one poll of A's success
    assert back
    doc = rollout(server, back)
    (record,) = doc["device_list"]
    assert record["status"] != "skipped", doc
    assert record["from_version"] == "1.1.0", record  # from the action report
    assert record["wave"] == 0 and doc["status"] == "running", doc
    told = dev.checkin()
    assert told.model is not None
    assert (told.model.version, told.model.rollout_id) == ("1.0.0", back)
    assert dev.install()
    assert rollout(server, back)["status"] == "succeeded"


def test_a_rollout_that_can_place_nothing_does_not_succeed(server: Server) -> None:
    """Every matched device is accounted for: unplaceable ones are counted with their reason,
    and a rollout that can move none of them pauses and says why instead of succeeding."""
    name = "nofit"
    small = fleet(server, name, 3, **TOO_SMALL)
    for dev in small:
        dev.checkin()
    rid = apply(server, name, "1.0.0")
    assert rid
    doc = rollout(server, rid)
    assert doc["status"] == "paused", doc
    assert doc["matched"] == 3 and doc["devices"] == 0
    assert doc["by_status"] == {"unplaceable": 3}
    assert sum(doc["unplaceable"].values()) == 3
    reason = doc["history"][-1]["reason"]
    assert "nothing can move" in reason and "3 unplaceable" in reason, reason
    assert "no device matched" not in reason
    assert {d["status"] for d in doc["device_list"]} == {"unplaceable"}
    assert all(d["detail"] for d in doc["device_list"])  # the reason, per device
    for dev in small:
        told = dev.checkin()
        assert told.model is None and told.unplaceable, told


# --- the property: interleavings of applies, check-ins and installs ----------------------------

Op = tuple[str, int]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.integers(0, 1)),
        st.tuples(st.just("checkin"), st.integers(0, 1)),
        st.tuples(st.just("install"), st.integers(0, 1)),
    ),
    min_size=4,
    max_size=12,
)
RUN = [0]
# the reproduction: on A by its report, on B by its last check-in, then B is applied
RACE: list[Op] = [
    ("apply", 0),
    ("checkin", 0),
    ("install", 0),
    ("checkin", 0),
    ("apply", 1),
    ("checkin", 0),
    ("install", 0),
    ("apply", 0),
    ("checkin", 0),
]


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
@example(ops=RACE)
def test_no_device_moves_outside_a_rollout(server: Server, ops: list[Op]) -> None:
    """Over any interleaving: a device is told a version only by a rollout assignment (or its
    revert), or the version it already runs (or, running none yet, a first install); and the
    latest rollout accounts for every device its blueprint governs."""
    RUN[0] += 1
    name = f"prop{RUN[0]}"
    agents = fleet(server, name, 2)
    rollouts: list[str] = []
    for kind, arg in ops:
        if kind == "apply":
            rid = apply(server, name, VERSIONS[arg])
            if rid:
                rollouts.append(rid)
            if rollouts:
                doc = rollout(server, rollouts[-1])
                assert doc["matched"] == len(agents), doc
                assert sum(doc["by_status"].values()) == len(agents), doc
                records = {d["device_id"]: d for d in doc["device_list"]}
                assert set(records) == {a.device_id for a in agents}
                for a in agents:  # skipped: already there, by its last check-in or report
                    if records[a.device_id]["status"] == "skipped":
                        assert a.running == doc["target_version"], (a, doc)
        elif kind == "checkin":
            agent = agents[arg]
            running = agent.running
            m = agent.checkin().model
            if m is None or m.version == running or running is None:
                continue
            assert m.rollout_id is not None, (
                f"{agent.device_id} runs {running} and was told {m.version} outside a rollout"
            )
            record = {d["device_id"]: d for d in rollout(server, m.rollout_id)["device_list"]}
            assert record[agent.device_id]["wave"] is not None, record
        else:
            agents[arg].install()


def test_report_does_not_reach_back_past_a_newer_checkin(server: Server) -> None:
    """A check-in is the device's own word on what it runs: a report only updates the version
    the server holds until the next check-in says otherwise."""
    name = "order"
    (dev,) = fleet(server, name, 1)
    dev.checkin()
    rid = apply(server, name, "1.0.0")
    assert rid
    dev.checkin()
    dev.install()
    dev.running = None  # e.g. the slot was wiped: the next check-in says "no model"
    dev.checkin()
    with server.client(server.admin) as c:
        r = c.get(f"/api/v1/devices/{dev.device_id}")
    assert r.status_code == 200, r.text
    assert r.json()["active"] is None
