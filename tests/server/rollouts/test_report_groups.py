"""Device reports stepped in groups per rollout (``server/combine.py``): every item runs exactly
once, items queued while a group runs form the next group (so a lock is taken once per group),
the lead passes on, a failed group runs each item on its own, and keys never mix."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import select

from factories.fleet_db import RID, context, database, make_fleet, start
from slmops.protocol.device import ActionStatus
from slmops.protocol.fleet import DeviceActionState
from slmops.server.action_reports import report_actions
from slmops.server.combine import Combiner
from slmops.server.context import Context
from slmops.server.db.models import Device, DeviceAction
from slmops.server.db.session import Database
from slmops.server.rollouts.store import load_full
from slmops.server.rollouts.tables import Rollout


def _submit_all(
    c: Combiner[int], keys: list[str], run_group: object, run_alone: object
) -> list[BaseException]:
    errors: list[BaseException] = []

    def one(i: int, key: str) -> None:
        try:
            c.submit(key, i, run_group, run_alone)  # type: ignore[arg-type]
        except BaseException as exc:  # collected for the test to look at
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, k)) for i, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a submitter never returned"
    return errors


def test_items_queued_during_a_group_run_together_once() -> None:
    ran: list[tuple[str, tuple[int, ...]]] = []
    inside = threading.Lock()

    def run_group(items: Sequence[int], key: str = "r1") -> None:
        assert inside.acquire(blocking=False), "two groups of one key ran at once"
        try:
            time.sleep(0.02)  # a transaction's worth of time: the others queue meanwhile
            ran.append((key, tuple(items)))
        finally:
            inside.release()

    c: Combiner[int] = Combiner()
    errors = _submit_all(c, ["r1"] * 60, run_group, lambda i: pytest.fail("not alone"))
    assert errors == []
    seen = Counter(i for _, items in ran for i in items)
    assert sorted(seen) == list(range(60)) and set(seen.values()) == {1}
    assert len(ran) < 60 and c.groups == len(ran) and c.items == 60  # grouped, not one by one
    assert c._leading == set() and c._queued == {}  # nothing left behind


def test_a_failed_group_runs_each_item_alone_and_errors_stay_their_own() -> None:
    alone: list[int] = []

    def run_group(items: Sequence[int]) -> None:
        time.sleep(0.01)
        if len(items) > 1 or items[0] == 7:
            raise RuntimeError("one bad report spoils the group")

    def run_alone(i: int) -> None:
        alone.append(i)
        if i == 7:
            raise ValueError("bad report 7")

    c: Combiner[int] = Combiner()
    errors = _submit_all(c, ["r1"] * 20, run_group, run_alone)
    assert [str(e) for e in errors] == ["bad report 7"]  # only its own request fails
    assert 7 in alone and c.failed_groups >= 1


def test_keys_do_not_wait_for_each_other_and_groups_are_bounded() -> None:
    groups: dict[str, list[int]] = {}
    lock = threading.Lock()

    def run_group(items: Sequence[int]) -> None:
        time.sleep(0.01)
        key = "even" if items[0] % 2 == 0 else "odd"
        assert all((i % 2 == 0) == (key == "even") for i in items), "keys mixed in one group"
        with lock:
            groups.setdefault(key, []).append(len(items))

    c: Combiner[int] = Combiner(max_group=5)
    keys = ["even" if i % 2 == 0 else "odd" for i in range(80)]
    assert _submit_all(c, keys, run_group, lambda i: None) == []
    assert sum(groups["even"]) == 40 and sum(groups["odd"]) == 40
    assert max(max(v) for v in groups.values()) <= 5


# --- the grouped /device/v1/actions path on real databases ------------------------------------

ALL_AT_ONCE = {
    "waves": [{"percent": 100}],
    "gates": {"min_soak_seconds": 1e6, "timeout_seconds": 2e6},
}


def _report_all(db: Database, ctx: Context, ids: list[str], state: DeviceActionState) -> None:
    """Every device reports ``state`` from its own thread and session, all at once."""
    barrier = threading.Barrier(len(ids))
    errors: list[BaseException] = []

    def one(device_id: str) -> None:
        try:
            with db.sessions() as s:
                device = s.scalar(select(Device).where(Device.device_id == device_id))
                assert device is not None
                status = ActionStatus(rollout_id=RID, version="2.0", state=state)
                barrier.wait(timeout=10)
                report_actions(s, device, [status], ctx)
        except BaseException as exc:  # collected for the test
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(d,)) for d in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_reports_of_a_wave_are_written_in_groups(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with database(kind, tmp_path, monkeypatch) as db:
        ctx = dataclasses.replace(context(tmp_path), reports=Combiner())
        ids = make_fleet(db, ctx, n=24, policy=ALL_AT_ONCE)
        assert start(db, ctx) == set(ids)
        with db.sessions() as s:
            before = {d.device_id: d.last_seen for d in s.scalars(select(Device))}
        _report_all(db, ctx, ids, DeviceActionState.DOWNLOADING)
        _report_all(db, ctx, ids, DeviceActionState.ACTIVE)
        assert ctx.reports is not None
        assert ctx.reports.items == 48 and ctx.reports.groups < 48  # grouped, not one by one
        assert ctx.reports.failed_groups == 0
        with db.sessions() as s:
            row = s.get(Rollout, RID)
            assert row is not None
            full = load_full(s, row)
            assert {d: r.status for d, r in full.devices.items()} == dict.fromkeys(
                ids, DeviceActionState.ACTIVE.value
            )
            actions = list(s.scalars(select(DeviceAction)))
            assert sorted((a.device_id, a.rollout_id, a.version, a.state) for a in actions) == [
                (d, RID, "2.0", "active") for d in sorted(ids)
            ]  # one row per key, the latest state
            for d in s.scalars(select(Device)):
                assert d.last_seen is not None and d.last_seen != before[d.device_id]
