"""A recompute from an older snapshot never overwrites a newer desired state (desired_store.py),
and ``settle`` recomputes in batches with the same answer as in one go; on SQLite and PostgreSQL.

The race is made deterministic by interleaving at the one point it happens: the older writer
has read its snapshot and computed its documents; just before it writes, another session (a
wave change: ``run_event`` of a START, as another request or API process would) assigns
devices and commits their new desired state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from control_plane import inventory
from factories.fleet_db import (
    ACTIVE,
    context,
    database,
    make_fleet,
    set_temperature,
    start,
    stored,
)
from slmops.protocol.device import CheckIn
from slmops.server import desired_store
from slmops.server.checkin import record_checkin
from slmops.server.db.models import Device
from slmops.server.db.session import Database
from slmops.server.desired import Refresher, refresh_devices
from slmops.server.reconcile import settle

CHANGED = "slmops.changed"  # server/invalidation.py: the session's marks, sent on commit


@pytest.fixture(params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Database]:
    with database(request.param, tmp_path, monkeypatch) as found:
        yield found


def _reason(doc: Any) -> str:
    return str((doc or {}).get("unplaceable"))


def _temperature(doc: Any) -> float:
    return float(doc["generation"]["temperature"])


def test_an_older_recompute_does_not_overwrite_a_newer_assignment(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    ids = make_fleet(db, ctx)
    with db.sessions() as s:
        refresh_devices(s, ctx.store, poll_seconds=ctx.poll_seconds)
        s.commit()
    set_temperature(db, 0.7)  # an apply: every lab device's document changes

    real_write = desired_store.write
    rounds: list[list[str]] = []
    moved: set[str] = set()
    older: list[Session] = []

    def interleaved(session: Session, writes: list[desired_store.Write]) -> Any:
        if not older:  # snapshot read, documents computed: now the wave change commits
            older.append(session)
            moved.update(start(db, ctx))  # its own writes pass through here too
        if session is older[0]:
            rounds.append(sorted(w.device.device_id for w in writes))
        return real_write(session, writes)

    monkeypatch.setattr(desired_store, "write", interleaved)
    with db.sessions() as s:  # the settle's recompute, from the snapshot before the START
        refresh_devices(s, ctx.store, poll_seconds=ctx.poll_seconds)
        marked = set(s.info.get(CHANGED, set()))
        s.commit()
    monkeypatch.setattr(desired_store, "write", real_write)

    assert len(moved) == 2
    # its first round computed every lab device from the older rollout; the moved ones were
    # recomputed from a new snapshot, which agreed with what the START wrote: nothing to write
    assert rounds == [ids, []]
    after = stored(db)
    for device_id in ids:
        doc = after[device_id][0]
        assert _temperature(doc) == 0.7
        want = "'2.0'" if device_id in moved else "'1.0'"
        assert want in _reason(doc), (device_id, doc)
    # only the writes that happened were marked for the other processes' check-in caches
    assert marked == set(ids) - moved
    # and what is stored is what a fresh recompute gives: it writes nothing
    with db.sessions() as s:
        refresh_devices(s, ctx.store, poll_seconds=ctx.poll_seconds)
        assert not s.info.get(CHANGED)
        s.rollback()


def test_a_lone_stale_write_clears_the_etag_instead(db: Database, tmp_path: Path) -> None:
    """``Refresher.refresh`` outside ``refresh_devices`` (a label change) cannot recompute:
    on a miss it keeps the newer document and drops the ETag, so the next check-in takes the
    full path and recomputes from current rows."""
    ctx = context(tmp_path)
    ids = make_fleet(db, ctx)
    with db.sessions() as s:
        refresh_devices(s, ctx.store, poll_seconds=ctx.poll_seconds)
        s.commit()
    before = stored(db)
    set_temperature(db, 0.7)  # so the stale recompute has something new to write
    with db.sessions() as s:
        devices = list(s.scalars(select(Device).order_by(Device.device_id)))
        refresher = Refresher(s, ctx.store, poll_seconds=ctx.poll_seconds)
        refresher.preload()  # the snapshot: the rollout before its START
        moved = start(db, ctx)
        for device in devices:
            refresher.refresh(device)
        marked = set(s.info.get(CHANGED, set()))
        s.commit()
    after = stored(db)
    assert len(moved) == 2 and marked == set(ids)  # written, or cleared: both are writes
    for device_id in ids:
        doc, etag = after[device_id]
        assert _temperature(doc) == 0.7
        if device_id in moved:
            assert "'2.0'" in _reason(doc) and etag is None  # the START's document, no ETag
        else:
            assert "'1.0'" in _reason(doc) and etag not in (None, before[device_id][1])


def test_settle_in_batches_gives_the_answer_of_one_batch(db: Database, tmp_path: Path) -> None:
    ctx = context(tmp_path)
    ids = make_fleet(db, ctx, n=7, others=2)
    start(db, ctx)
    results = []
    for batch in (1_000, 2):
        with db.engine.begin() as conn:  # forget every desired state
            conn.execute(update(Device).values(desired=None, desired_etag=None))
        commits: list[Session] = []
        with db.sessions() as s:
            event.listen(s, "after_commit", commits.append)
            counts = settle(s, ctx, batch=batch)
        results.append((counts, stored(db), len(commits)))
    (one, docs, one_commits), (batched, docs_batched, batched_commits) = results
    assert one == batched == {"lab": len(ids)}
    assert docs_batched == docs
    assert all(doc is not None for doc, _ in docs.values())
    # 9 devices, 2 a batch: a commit after each of 5 batches instead of after 1
    assert batched_commits - one_commits == 4


def test_a_full_checkin_racing_a_wave_change_answers_the_newer_state(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check-in's full path computed the device's state before the START committed; it
    neither overwrites the START's document nor answers the older one."""
    ctx = context(tmp_path)
    every = {
        "waves": [{"percent": 100}],
        "gates": {"min_soak_seconds": 1e6, "timeout_seconds": 2e6},
    }
    make_fleet(db, ctx, n=2, policy=every)
    with db.sessions() as s:
        refresh_devices(s, ctx.store, poll_seconds=ctx.poll_seconds)
        s.commit()

    real_write = desired_store.write
    older: list[Session] = []
    moved: set[str] = set()

    def interleaved(session: Session, writes: list[desired_store.Write]) -> Any:
        if not older:
            older.append(session)
            moved.update(start(db, ctx))
        return real_write(session, writes)

    monkeypatch.setattr(desired_store, "write", interleaved)
    body = CheckIn.model_validate(
        {
            "inventory": inventory(labels={"site": "lab"}, free_disk_bytes=1 << 30),  # changed
            "active": ACTIVE,
        }
    )
    with db.sessions() as s:
        device = s.scalar(select(Device).where(Device.device_id == "dev-00"))
        assert device is not None
        answer = record_checkin(s, device, body, ctx, now=ctx.now)
    assert moved == {"dev-00", "dev-01"}
    doc, etag = stored(db)["dev-00"]
    assert "'2.0'" in _reason(doc) and answer.etag == etag
    assert answer.payload is not None and b"'2.0'" in answer.payload
