"""Section f of bench/fleet_scale.py: applying a blueprint over a big fleet.

An apply that changes the version creates a rollout that places every matching device, and
recomputes every device's desired state: about a minute at 100,000 devices on this box. Measured
here on N enrolled simulated devices (20,000; --full 100,000), each apply changing the version
(rollouts created with ``start: manual``, so no device moves and only the apply is timed):

- asynchronous (``Prefer: respond-async``): how long the PUT took to answer, and how long until
  GET says the generation is settled (``Plane.apply``);
- synchronous (no ``Prefer``): how long the one request took;
- unchanged (the same spec again): the no-op answer.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from _load import Plane, sim_config, staged_spec
from slmops.fleet.simulator import Simulator


def _spec(version: str, n: int) -> dict[str, Any]:
    spec = staged_spec("apply", version, [1.0, 100.0], 600.0, n)
    spec["rollout"]["start"] = "manual"
    return spec


def _sync_put(pl: Plane, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """A PUT without ``Prefer``: it answers once settled."""
    doc = {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": "apply"}}
    t = time.monotonic()
    body = pl.api("PUT", "/api/v1/blueprints/apply", doc | {"spec": spec}, timeout=1800)
    return time.monotonic() - t, body


def apply_cost(pl: Plane, args: argparse.Namespace) -> dict[str, Any]:
    n = args.apply_devices
    token = pl.enrollment_token({"fleet": "apply"})
    cfg = sim_config(pl, None, token, prefix="apply", devices=n, poll=60.0, telemetry=False)
    sim = Simulator(cfg)
    t0 = time.monotonic()
    asyncio.run(sim.enroll())
    out: dict[str, Any] = {"devices": n, "enroll_seconds": round(time.monotonic() - t0, 1)}
    runs: list[dict[str, Any]] = []
    for version in ("1.0.0", "2.0.0"):
        rollout = pl.apply("apply", _spec(version, n))
        runs.append(
            {
                "version": version,
                "answer_ms": pl.last_answer_ms,
                "settled_s": pl.last_apply_s,
                "rollout": rollout,
            }
        )
    out["async"] = runs
    took, body = _sync_put(pl, _spec("1.0.0", n))
    out["sync"] = {
        "seconds": round(took, 1),
        "devices": body["devices"],
        "rollout": body["rollout"],
    }
    took, body = _sync_put(pl, _spec("1.0.0", n))
    out["unchanged_ms"] = round(took * 1000, 1)
    out["unchanged_changed"] = body["changed"]
    return out
