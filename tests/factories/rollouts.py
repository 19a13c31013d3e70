"""Rollouts driven from the outside: built bundles per version, simulated devices speaking the
device API (enroll, check-in with action statuses), operator calls on /api/v1/rollouts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories.blueprints import FITS, MODEL
from factories.bundles import make_inputs
from factories.server import (
    Server,
    _server,
    credential,
    enrollment_token,
    inventory,
)
from slmops.bundle.build import build_bundle
from slmops.bundle.registry import push
from slmops.protocol.device import DesiredState

MAIN = [sys.executable, "-m", "slmops.cli.main"]
TICK = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"}
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
FINAL = {"succeeded", "rolled-back", "aborted"}


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


def push_all(server: Server, bundles: dict[str, Path]) -> None:
    address = server.url.removeprefix("http://")
    for version, path in bundles.items():
        push(path, f"oci://{address}/{MODEL}:{version}", token=server.admin)


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
