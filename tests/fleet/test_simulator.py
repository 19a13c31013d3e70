"""The fleet simulator against a real `slmops server run` (SQLite and PostgreSQL).

Fifty simulated devices enroll with a real enrollment token, poll with ETags, and a blueprint
applied after they enrolled starts a staged rollout (10 %, then 100 %) of a real bundle pushed
to the server's registry: the simulator must see every device walk the install phases to the
new version, the rollout end ``succeeded`` on the server, and report the fields the CLI prints.
A second run makes the new version fail everywhere: the canary fails and the rollout is rolled
back before any device outside the canary moved. The canned responder gives the ceiling.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_plane import ControlPlane
from slmops.bundle.build import build_bundle
from slmops.fleet.simulator import SimConfig, Simulator

MODEL = "sim/bot"
FAST = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2", "SLMOPS_POLL_SECONDS": "1"}
# No error is tolerated: concurrent reports to one rollout once ran out of optimistic retries
# on PostgreSQL (a 500 on /device/v1/actions); the rollout row is now read FOR UPDATE.
TOLERATED: set[str] = set()
REPORT_FIELDS = {
    "checkins",
    "checkins_per_s",
    "checkin_p50_ms",
    "checkin_p99_ms",
    "ratio_304",
    "errors",
    "error_count",
    "versions_over_time",
    "time_to_converge_s",
    "devices_told_multiple_targets",
    "enrolled",
    "final_versions",
}


def _factories() -> Any:
    path = Path(__file__).parents[1] / "factories" / "bundles.py"
    spec = importlib.util.spec_from_file_location("_sim_bundle_factories", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of a bundle over fabricated variants (real bundle builder); each version's
    weights differ, so moving to 2.0.0 is an install and not a relabel of the same content."""
    factories = _factories()
    original = dict(factories.VARIANTS)
    root = tmp_path_factory.mktemp("sim-bundles")
    out = {}
    for version in ("1.0.0", "2.0.0"):
        factories.VARIANTS = {
            name: (fmt, quant, {rel: data + version.encode() for rel, data in files.items()})
            for name, (fmt, quant, files) in original.items()
        }
        variants, report = factories.make_inputs(root / version / "in", None)
        out[version] = build_bundle(
            variants, report, name=MODEL, version=version, out=root / version / "bundle"
        ).path
    return out


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cp(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    bundles: dict[str, Path],
) -> Iterator[ControlPlane]:
    with _database(request.param) as db_env:
        old = {k: os.environ.get(k) for k in db_env}
        os.environ.update(db_env)  # the admin token the ControlPlane creates goes to that DB
        try:
            plane = ControlPlane(tmp_path_factory.mktemp(f"sim-{request.param}"), FAST | db_env)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        plane.start()
        try:
            for version, path in bundles.items():
                plane.push(path, MODEL, version)
            yield plane
        finally:
            plane.stop()


class _database:
    """No extra environment for SQLite; a throwaway PostgreSQL cluster's URL otherwise."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.cm: Any = None

    def __enter__(self) -> dict[str, str]:
        if self.kind == "sqlite":
            return {}
        from pg import postgres_cluster

        self.cm = postgres_cluster()
        return {"SLMOPS_DB_URL": self.cm.__enter__()}

    def __exit__(self, *exc: object) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


def blueprint(fleet: str, version: str) -> dict[str, Any]:
    return {
        "selector": {"fleet": fleet},
        "model": {"name": MODEL, "version": version},
        "rollout": {
            "waves": [{"percent": 10}, {"percent": 100}],
            "gates": {"min_soak_seconds": 0.5, "timeout_seconds": 60, "min_reported": 1.0},
        },
    }


def config(cp: ControlPlane, fleet: str, **over: Any) -> SimConfig:
    cfg = SimConfig(
        servers=[cp.url],
        enroll_token=cp.enrollment_token({"fleet": fleet}),
        devices=50,
        poll=0.5,
        duration=25,
        concurrency=16,
        prefix=fleet,
        latencies={s: 0.05 for s in ("downloading", "verifying", "installing", "health-checking")},
        sample_seconds=0.25,
        until_converged=True,
        seed=3,
    )
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


async def _enroll_apply_simulate(
    cp: ControlPlane, sim: Simulator, name: str, spec: dict[str, Any]
) -> tuple[int, str | None, dict[str, Any]]:
    enrolled = await sim.enroll()
    rollout = await asyncio.to_thread(cp.apply, name, spec)
    report = await sim.simulate()
    return enrolled, rollout, report


def test_a_rollout_converges_through_the_simulated_fleet(cp: ControlPlane) -> None:
    fleet = "simok"
    sim = Simulator(config(cp, fleet, converge_version="1.0.0"))
    try:
        enrolled, rollout_id, report = asyncio.run(
            _enroll_apply_simulate(cp, sim, fleet, blueprint(fleet, "1.0.0"))
        )
    finally:
        sim.close()
    assert enrolled == 50 and report["enrolled"] == 50
    assert set(report) >= REPORT_FIELDS
    assert report["status"]["enroll"] == {"201": 50}
    assert set(report["errors"]) <= TOLERATED, report["errors"]
    assert report["checkins"] >= 50 and report["checkins_per_s"] > 0
    assert 0 < report["ratio_304"] < 1  # the first poll of each device is a 200, later ones 304
    assert report["checkin_p50_ms"] <= report["checkin_p99_ms"]
    assert report["time_to_converge_s"] is not None, (
        report["status"],
        report["events"],
        json.dumps(cp.rollout(str(rollout_id)))[:3000],
    )
    assert report["final_versions"] == {"1.0.0": 50}
    assert report["events"]["installs_succeeded"] == 50
    assert report["devices_told_multiple_targets"] == 0
    first, last = report["versions_over_time"][0], report["versions_over_time"][-1]
    assert first["versions"] == {"none": 50} and last["versions"] == {"1.0.0": 50}
    assert rollout_id is not None
    done = cp.wait_rollout(rollout_id, timeout=20)
    assert done["status"] == "succeeded"
    assert done["by_status"] == {"active": 50}
    server_side = {d["device_id"]: d for d in cp.devices() if d["device_id"].startswith(fleet)}
    assert len(server_side) == 50
    assert all((d["active"] or {}).get("version") == "1.0.0" for d in server_side.values())

    # a second session on the same devices: telemetry windows every second, some devices offline
    sim.cfg.telemetry_seconds, sim.cfg.offline_rate, sim.cfg.until_converged = 1.0, 0.2, False
    try:
        idle = asyncio.run(sim.simulate(duration=3.5))
    finally:
        sim.close()
    assert idle["status"]["telemetry"] == {"200": idle["status"]["telemetry"].get("200", 0)}
    assert idle["status"]["telemetry"]["200"] >= 50, idle["status"]
    assert idle["events"]["went_offline"] > 0 and idle["events"]["came_back"] > 0
    assert idle["ratio_304"] > 0.9 and idle["final_versions"] == {"1.0.0": 50}


def test_a_failing_canary_is_rolled_back_before_the_rest_moves(cp: ControlPlane) -> None:
    fleet = "simbad"
    cfg = config(cp, fleet, converge_version="1.0.0")
    sim = Simulator(cfg)
    try:
        asyncio.run(_enroll_apply_simulate(cp, sim, fleet, blueprint(fleet, "1.0.0")))
        cfg.fail_versions = {"2.0.0": 1.0}
        cfg.converge_version, cfg.until_converged = None, False
        rollout_id = cp.apply(fleet, blueprint(fleet, "2.0.0"))
        assert rollout_id is not None
        report = asyncio.run(sim.simulate(duration=6))
    finally:
        sim.close()
    done = cp.wait_rollout(rollout_id, timeout=20)
    assert done["status"] == "rolled-back", json.dumps(done)[:2000]
    wave0 = cp.api("GET", f"/api/v1/rollouts/{rollout_id}?wave=0&limit=1000")["device_list"]
    canary = {d["device_id"] for d in wave0 if d["wave"] == 0}
    assert 1 <= len(canary) <= 5  # 10 % of 50
    told_new = {d for d, versions in sim.stats.told.items() if "2.0.0" in versions}
    assert told_new <= canary, "a device outside the canary was told the failing version"
    assert report["events"]["installs_failed"] == len(told_new)
    assert report["final_versions"] == {"1.0.0": 50}  # nobody ever ran the bad version


def test_the_cli_reports_json_and_its_canned_ceiling() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "slmops.cli.main",
            "fleet",
            "simulate",
            "--canned",
            "--devices",
            "200",
            "--poll",
            "0.5",
            "--duration",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["enrolled"] == 200 and report["error_count"] == 0
    assert report["checkins"] >= 400 and report["ratio_304"] > 0.5


def test_bad_options_are_refused_with_the_option_named() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "slmops.cli.main",
            "fleet",
            "simulate",
            "--canned",
            "--failure-rate",
            "1.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    err = json.loads(res.stdout)
    assert err["where"] == "--failure-rate" and "between 0 and 1" in err["message"]


def test_an_unreachable_server_is_an_error_not_an_empty_report() -> None:
    from helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "slmops.cli.main",
            "fleet",
            "simulate",
            "--server",
            url,
            "--enroll-token",
            "slme_not-a-real-token",
            "--devices",
            "3",
            "--duration",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    err = json.loads(res.stdout)
    assert "no device could enroll" in err["message"] and "enroll:connect" in err["message"]
    assert err["where"] == url
