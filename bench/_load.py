"""Shared pieces of the fleet load benchmarks: a control plane of N API processes on one
PostgreSQL, bundles to roll out, blueprint specs, and a simulated rollout watched to its end.

Used by bench/fleet_scale.py; kept apart so each bench module stays readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from fleet import cli_json, free_port, running, server_cli  # noqa: E402
from slmops.bundle.build import build_bundle  # noqa: E402
from slmops.fleet.simulator import SimConfig, Simulator  # noqa: E402

MODEL = "scale/bot"
TERMINAL = {"succeeded", "rolled-back", "aborted"}
FLEET_100K_PER_S = 100_000 / 60


# --- a control plane of N API processes on one PostgreSQL -----------------------------------


@dataclass
class Plane:
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]
    admin: str
    db_url: str
    logs: list[Path] = field(default_factory=list)
    last_apply_s: float | None = None
    last_answer_ms: float | None = None

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        url: str | None = None,
        timeout: float = 60.0,
        headers: dict[str, str] | None = None,
    ) -> Any:
        r = httpx.request(
            method,
            (url or self.urls[0]) + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin}"} | (headers or {}),
            timeout=timeout,
        )
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def enrollment_token(self, labels: dict[str, str]) -> str:
        return str(self.api("POST", "/api/v1/enrollment-tokens", {"labels": labels})["token"])

    def apply(self, name: str, spec: dict[str, Any]) -> str | None:
        """PUT the blueprint asynchronously (``Prefer: respond-async``: the answer comes once the
        spec is stored), then poll it until settled (every matching device placed, its rollout
        created: about a minute at 100,000 devices here); its rollout's id.
        ``last_answer_ms`` keeps how long the PUT took, ``last_apply_s`` the whole apply."""
        doc = {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": name}}
        path = f"/api/v1/blueprints/{name}"
        t = time.monotonic()
        applied = self.api("PUT", path, doc | {"spec": spec}, headers={"Prefer": "respond-async"})
        self.last_answer_ms = round((time.monotonic() - t) * 1000, 1)
        generation = applied["generation"]
        while applied["settled_generation"] < generation:
            if time.monotonic() - t > 1800:
                raise RuntimeError(f"blueprint {name} not settled after 1800 s")
            time.sleep(0.5)
            applied = self.api("GET", path)
        self.last_apply_s = round(time.monotonic() - t, 1)
        rollout = (
            applied["settled_rollout"] if applied["settled_generation"] == generation else None
        )
        return None if rollout is None else str(rollout)

    def rollout_devices(self, rollout_id: str, wave: int | None = None) -> list[dict[str, Any]]:
        """Every device entry of a rollout (``wave``: only those that wave moved), page by page
        when the API pages ``device_list`` (``device_page.next``), in one read when it does not."""
        out: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            query = "?limit=1000" + (f"&wave={wave}" if wave is not None else "")
            query += f"&after={after}" if after else ""
            doc = self.api("GET", f"/api/v1/rollouts/{rollout_id}{query}")
            out += doc["device_list"]
            after = (doc.get("device_page") or {}).get("next")
            if not after:
                return out

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """The rollout's counts and waves (``limit=0``: no device page, which the watchers
        polling twice a second do not read and which cost the server more than the rest)."""
        for url in self.urls:  # any live process answers
            with contextlib.suppress(httpx.TransportError, RuntimeError):
                path = f"/api/v1/rollouts/{rollout_id}?limit=0"
                doc: dict[str, Any] = self.api("GET", path, url=url)
                return doc
        raise RuntimeError("no API process answers")


@contextlib.contextmanager
def plane(work: Path, db_url: str, processes: int, env: dict[str, str]) -> Iterator[Plane]:
    """``processes`` x `slmops server run` on one database, started one after the other (the
    first creates the schema)."""
    data = work / "plane"
    data.mkdir(parents=True, exist_ok=True)
    dbargs = ["--db", db_url]
    admin = cli_json(server_cli("token", "create", "--data", data, "--role", "admin", *dbargs))
    full_env = {**os.environ, **env}
    with contextlib.ExitStack() as stack:
        urls, procs, logs = [], [], []
        for i in range(processes):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = work / f"server-{i}.log"
            cmd = server_cli("run", "--data", data, "--port", port, *dbargs)
            procs.append(stack.enter_context(running(cmd, url + "/healthz", log, full_env)))
            urls.append(url)
            logs.append(log)
        yield Plane(urls, procs, str(admin["token"]), db_url, logs)


def bundles(work: Path) -> dict[str, Path]:
    """Two versions over fabricated variants (tests/bundle's factories), weights differing per
    version so 2.0.0 is a real install, not a relabel of 1.0.0's content."""
    path = ROOT / "tests" / "factories" / "bundles.py"
    spec = importlib.util.spec_from_file_location("_scale_bundle_factories", path)
    assert spec is not None and spec.loader is not None
    factories = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = factories
    spec.loader.exec_module(factories)
    original = dict(factories.VARIANTS)
    out = {}
    for version in ("1.0.0", "2.0.0"):
        factories.VARIANTS = {
            n: (fmt, q, {rel: data + version.encode() for rel, data in files.items()})
            for n, (fmt, q, files) in original.items()
        }
        variants, report = factories.make_inputs(work / "bundles" / version / "in", None)
        out[version] = build_bundle(
            variants, report, name=MODEL, version=version, out=work / "bundles" / version / "b"
        ).path
    return out


def staged_spec(
    fleet: str, version: str, waves: list[float], soak: float, devices: int = 0
) -> dict[str, Any]:
    """A staged rollout's blueprint spec. A wave that makes no decision within the gate
    timeout pauses the rollout: at least ten soaks, and a twentieth of a second per device
    (this box moved 100,000 simulated devices at ~220 action reports/s, so a 40,000-device
    wave took ~20 min and paused at a 10-minute timeout)."""
    return {
        "selector": {"fleet": fleet},
        "model": {"name": MODEL, "version": version},
        "rollout": {
            "waves": [{"percent": p} for p in waves],
            "gates": {
                "min_soak_seconds": soak,
                "timeout_seconds": max(120.0, soak * 10, devices / 20),
                "min_reported": 1.0,
                "on_failure": "rollback",
            },
        },
    }


def sim_config(pl: Plane | None, url: str | None, token: str, **kw: Any) -> SimConfig:
    servers = pl.urls if pl is not None else [url or ""] * 2
    return SimConfig(servers=servers, enroll_token=token, **kw)


async def rollout_run(
    pl: Plane,
    sim: Simulator,
    apply: Callable[[], str | None],
    limit: float,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[str | None, dict[str, Any], dict[str, Any] | None]:
    """Apply (off the event loop), simulate until the rollout ends, ``until(doc)`` holds for
    its document, or ``limit`` s pass."""
    rollout_id = await asyncio.to_thread(apply)
    final: dict[str, Any] | None = None

    async def watch() -> None:
        nonlocal final
        while rollout_id is not None:
            await asyncio.sleep(0.5)
            doc = await asyncio.to_thread(pl.rollout, rollout_id)
            reached = until is not None and until(doc)
            if doc["status"] in TERMINAL or reached:
                final = doc
                if not reached:
                    await asyncio.sleep(sim.cfg.scaled(sim.cfg.poll) * 2)  # last reports land
                sim.stop()
                return

    watcher = asyncio.create_task(watch())
    report = await sim.simulate(limit)
    watcher.cancel()
    if final is None and rollout_id is not None:  # ran out of time: report where it stands
        final = await asyncio.to_thread(pl.rollout, rollout_id)
    return rollout_id, report, final


def wave_times(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not doc:
        return []
    return [
        {
            "wave": w["size"],
            "target": w["target"],
            "seconds": (
                round(w["ended_at"] - w["started_at"], 2)
                if w.get("ended_at") and w.get("started_at")
                else None
            ),
            "outcome": w["outcome"],
        }
        for w in doc["wave_list"]
    ]


def db_bytes(url: str) -> int:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0
