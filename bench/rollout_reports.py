"""Server time per device report against the rollout's size, in-process, side by side.

One database (SQLite in a temp folder, or ``--db URL``), one started rollout per size (wave 0
assigned, soak long enough that no wave passes), then install progress reports fed through
``server.rollouts.run_event`` (what ``/device/v1/actions`` calls), alternating between the
rollouts so that load on the machine hits every size alike. Prints the median time per report
per size, the ratio of the largest to the smallest, the time to create and start each rollout,
and the database size per device (SQLite).

    .venv/bin/python bench/rollout_reports.py [--sizes 1000,10000,100000] [--reports 200]
        [--db postgresql+psycopg://...] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from slmops.server.context import Context
from slmops.server.db.session import open_database
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts.machine import DeviceReport
from slmops.server.rollouts.service import run_event
from slmops.server.settings import load_settings


def _factory() -> Any:
    """tests/factories/rollout_scale.py: the same rollout builder the report-cost test uses."""
    path = Path(__file__).resolve().parents[1] / "tests" / "factories" / "rollout_scale.py"
    spec = importlib.util.spec_from_file_location("_rollout_scale_factory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000", help="devices per rollout, comma list")
    ap.add_argument("--reports", type=int, default=200, help="reports per rollout")
    ap.add_argument("--db", help="database URL (default: SQLite in a temp folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    data = Path(tempfile.mkdtemp(prefix="slmops-rollout-bench-"))
    over = {"db_url": args.db} if args.db else {}
    db = open_database(load_settings(data_dir=data, **over))
    ctx = Context(BlobStore(data), 60.0, now=1000.0)
    out: dict[str, Any] = {"sizes": sizes, "reports": args.reports, "setup_s": {}}
    moved: dict[int, list[str]] = {}
    factory = _factory()
    for n in sizes:
        t0 = time.perf_counter()
        moved[n] = factory.started_rollout(db, ctx, f"r{n}", n)
        out["setup_s"][n] = round(time.perf_counter() - t0, 2)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with db.sessions() as session:
        for k in range(args.reports):
            for n in sizes:
                ids = moved[n]
                event = DeviceReport(device_id=ids[k % len(ids)], state=factory.STAGES[k % 3])
                t0 = time.perf_counter()
                run_event(session, f"r{n}", event, ctx)
                times[n].append(time.perf_counter() - t0)
    db.dispose()
    warm = max(1, args.reports // 10)
    median = {n: statistics.median(t[warm:]) * 1000 for n, t in times.items()}
    out["median_ms"] = {n: round(v, 2) for n, v in median.items()}
    out["ratio_largest_to_smallest"] = round(median[sizes[-1]] / median[sizes[0]], 2)
    if not args.db:
        total = sum(f.stat().st_size for f in data.glob("*.db*"))
        out["sqlite_bytes_per_device"] = round(total / sum(sizes))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for n in sizes:
        print(f"{n:>9,} devices: {median[n]:7.2f} ms/report (setup {out['setup_s'][n]} s)")
    print(f"ratio {sizes[-1]:,} / {sizes[0]:,}: {out['ratio_largest_to_smallest']} (target <= 2)")
    if "sqlite_bytes_per_device" in out:
        print(f"SQLite size per device: {out['sqlite_bytes_per_device']} bytes")


if __name__ == "__main__":
    main()
