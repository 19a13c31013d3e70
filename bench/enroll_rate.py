"""Enrollments per second through the real device protocol (POST /device/v1/enroll).

Issue 12's 100,000-device staged rollout enrolls every simulated device first, so the
enrollment rate bounds how long such a run takes before any rollout starts (target: 100k in
<= 5 min, i.e. >= 333/s, with 2 API processes on PostgreSQL on this 2-core box). Measures N
fresh devices enrolling with one enrollment token (the simulator's enroll path, the same one
bench/fleet_scale.py section c uses) against:

- ``sqlite``: one API process on SQLite (the default deployment);
- ``postgresql``: two API processes on one throwaway PostgreSQL cluster (tests/pg.py).

Prints enrollments/s per setup and checks the token's use counter equals the number enrolled
(the counter is a hot row every enrollment touches). ``--baseline REF`` also runs each setup
with the server code of git ref REF (``git archive``, read-only, into a temp folder put first
on the servers' PYTHONPATH), one right before the other, so a before/after ratio comes from
the same run on the same (shared, noisy) box. The database schema is created by the current
code, so REF must have the same migrations.

    .venv/bin/python bench/enroll_rate.py --devices 3000 --baseline HEAD

Profiling: py-spy (in the venv) stops the traced server for each sample in this VM and
stalled it for minutes; profile the route in-process with cProfile instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _load import Plane, plane, sim_config  # noqa: E402
from fleet import scratch  # noqa: E402
from pg import postgres_cluster  # noqa: E402
from slmops.fleet.simulator import Simulator  # noqa: E402


def _token_uses(pl: Plane) -> int | None:
    rows = pl.api("GET", "/api/v1/enrollment-tokens")["data"]
    return max((int(r["uses"]) for r in rows), default=None)


def measure(pl: Plane, n: int, concurrency: int) -> dict[str, Any]:
    token = pl.enrollment_token({"fleet": "enroll"})
    warm = Simulator(sim_config(pl, None, token, prefix="warm", devices=50))
    asyncio.run(warm.enroll())  # connections, imports and caches warm before timing
    sim = Simulator(
        sim_config(pl, None, token, prefix="enroll", devices=n, concurrency=concurrency)
    )
    t0 = time.perf_counter()
    enrolled = asyncio.run(sim.enroll())
    seconds = time.perf_counter() - t0
    statuses = {str(k): v for k, v in sim.stats.status.get("enroll", {}).items()}
    return {
        "devices": n,
        "enrolled": enrolled,
        "seconds": round(seconds, 2),
        "per_s": round(enrolled / seconds, 1) if seconds else None,
        "statuses": statuses,
        "errors": dict(sim.stats.errors),
        "token_uses": _token_uses(pl),
        "expected_uses": enrolled + 50,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--devices", type=int, default=3000, help="devices enrolled per setup")
    ap.add_argument("--concurrency", type=int, default=64, help="connections per API process")
    ap.add_argument("--skip", default="", help="comma list of setups: sqlite,postgresql")
    ap.add_argument("--baseline", help="git ref whose server code runs beside the current one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = scratch("slmops-bench-enroll-")
    codes: list[tuple[str, dict[str, str]]] = []
    if args.baseline:
        base = work / "baseline"
        base.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline, "src"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        codes.append((f"{args.baseline} ", {"PYTHONPATH": str(base / "src")}))
    codes.append(("", {}))
    res: dict[str, Any] = {}
    for setup in ("sqlite", "postgresql"):  # before and after one right after the other
        for label, env in codes:
            if setup in skip:
                continue
            where = work / f"run{len(res)}"
            if setup == "sqlite":
                with plane(where, f"sqlite:///{where / 'slmops.db'}", 1, env) as pl:
                    res[f"{label}sqlite, 1 process"] = measure(pl, args.devices, args.concurrency)
                continue
            with postgres_cluster() as db_url, plane(where, db_url, 2, env) as pl:
                res[f"{label}postgresql, 2 processes"] = measure(pl, args.devices, args.concurrency)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for name, r in res.items():
        ok = "ok" if r["token_uses"] == r["expected_uses"] else "MISMATCH"
        eta = 100_000 / r["per_s"] / 60 if r["per_s"] else float("nan")
        print(
            f"{name:30}  {r['enrolled']:>7,} enrolled in {r['seconds']:7.1f} s  "
            f"{r['per_s']:>7.1f}/s  (100k in {eta:4.1f} min)  token uses {r['token_uses']} "
            f"({ok})  statuses {r['statuses']}  errors {r['errors'] or '-'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
