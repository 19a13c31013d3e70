"""Server time per device report does not grow with the rollout (issue 12, at test size).

Two rollouts in one SQLite database, one over 1,000 devices and one over 10,000, started (wave 0
assigned) and then fed install progress reports through ``run_event``, the same function the
device API calls, alternating between the two so that load on the machine hits both alike.
Before per-device rows, each report re-read and re-wrote the whole document, so the 10k rollout
took about ten times as long per report; now a report reads and writes one device row and the
rollout's summary, whose size does not depend on the number of devices.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from sqlalchemy import func, select

from factories.rollout_scale import STAGES, started_rollout
from slmops.server.context import Context
from slmops.server.db.session import open_database
from slmops.server.registry.store import BlobStore
from slmops.server.rollouts.machine import DeviceReport
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.store import load_full
from slmops.server.rollouts.tables import Rollout, RolloutDevice
from slmops.server.settings import load_settings


def test_time_per_device_report_is_flat_from_1k_to_10k_devices(tmp_path: Path) -> None:
    db = open_database(load_settings(data_dir=tmp_path))
    ctx = Context(BlobStore(tmp_path), 60.0, now=1000.0)
    try:
        small = started_rollout(db, ctx, "small", 1_000)
        large = started_rollout(db, ctx, "large", 10_000)
        assert (len(small), len(large)) == (10, 100)  # the default 1% canary
        times: dict[str, list[float]] = {"small": [], "large": []}
        with db.sessions() as session:
            for k in range(90):
                for rid, moved in (("small", small), ("large", large)):
                    event = DeviceReport(device_id=moved[k % len(moved)], state=STAGES[k % 3])
                    t0 = time.perf_counter()
                    run_event(session, rid, event, ctx)
                    times[rid].append(time.perf_counter() - t0)
            sizes = {
                rid: len(row.state_json)
                for rid in times
                if (row := session.get(Rollout, rid, populate_existing=True)) is not None
            }
            rows = dict(
                session.execute(
                    select(RolloutDevice.rollout_id, func.count()).group_by(
                        RolloutDevice.rollout_id
                    )
                ).all()
            )
            large_row = session.get(Rollout, "large")
            assert large_row is not None
            status = load_full(session, large_row).tally.statuses
    finally:
        db.dispose()
    assert rows == {"small": 1_000, "large": 10_000}
    assert status == {
        "queued": 9_900,
        "scheduled": 10,
        "downloading": 30,
        "verifying": 30,
        "installing": 30,
    }
    # the summary written on every report does not grow with the fleet
    assert sizes["large"] < 1.5 * sizes["small"], sizes
    median = {rid: statistics.median(t[10:]) for rid, t in times.items()}  # after warm-up
    ratio = median["large"] / median["small"]
    print(f"median s/report: {median}, ratio 10k/1k {ratio:.2f}")
    assert ratio < 2.5, median
