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
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from slmops.protocol.fleet import DeviceActionState
from slmops.server.context import Context
from slmops.server.db.models import Rollout, utcnow
from slmops.server.db.session import Database, open_database
from slmops.server.registry.store import BlobStore
from slmops.server.rollout import (
    DeviceReport,
    DevicesMatched,
    MatchedDevice,
    OperatorAction,
    OperatorCommand,
    RolloutPolicy,
    create_rollout,
)
from slmops.server.rollout_rows import load_full
from slmops.server.rollouts import run_event
from slmops.server.settings import load_settings

SLOW = RolloutPolicy.from_data({"gates": {"min_soak_seconds": 1e6, "timeout_seconds": 2e6}})
STAGES = [DeviceActionState.DOWNLOADING, DeviceActionState.VERIFYING, DeviceActionState.INSTALLING]


def started(db: Database, ctx: Context, rollout_id: str, n: int) -> list[str]:
    """A running rollout over ``n`` devices; the devices its first wave assigned."""
    state = create_rollout(rollout_id, "2.0", now=ctx.now, policy=SLOW)
    with db.sessions() as session:
        session.add(
            Rollout(
                id=rollout_id,
                blueprint=rollout_id,
                model="m",
                target_version="2.0",
                state_json=state.to_json(),
                status=state.status.value,
                revision=0,
                seq=1,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
        session.commit()
        devices = [
            MatchedDevice(
                device_id=f"{rollout_id}-{i:07}",
                hardware_class=("pi5", "jetson", "nuc")[i % 3],
                current_version="1.0",
            )
            for i in range(n)
        ]
        run_event(session, rollout_id, DevicesMatched(devices=devices), ctx)
        run_event(session, rollout_id, OperatorCommand(action=OperatorAction.START, actor="b"), ctx)
        row = session.get(Rollout, rollout_id)
        assert row is not None
        return sorted(i for i, d in load_full(session, row).devices.items() if d.wave == 0)


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
    for n in sizes:
        t0 = time.perf_counter()
        moved[n] = started(db, ctx, f"r{n}", n)
        out["setup_s"][n] = round(time.perf_counter() - t0, 2)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with db.sessions() as session:
        for k in range(args.reports):
            for n in sizes:
                ids = moved[n]
                event = DeviceReport(device_id=ids[k % len(ids)], state=STAGES[k % 3])
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
