"""Applies settled after the answer: the lease, the holder that takes newer generations, the
ticker that finishes what a dead settler left, and the 202 a big fleet's apply answers.

In-process tests drive the service functions on a real SQLite or PostgreSQL database (the
fleet of ``factories/fleet_db.py``: six lab devices whose blueprint sets the temperature, so a
settle shows in every stored desired state); the HTTP test runs a real `slmops server run`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request

from factories.blueprints import FITS, MODEL, apply, blueprint, push_version, write
from factories.fleet_db import BLUEPRINT, context, database, make_fleet, spec, stored
from factories.server import Server, _server, credential, enrollment_token, make_token
from slmops.server.blueprints import service
from slmops.server.blueprints import settling as settling_module
from slmops.server.blueprints.document import Blueprint
from slmops.server.blueprints.routes import MAX_WAIT, async_wait
from slmops.server.blueprints.settling import claim, settle_behind, settle_claimed, settling
from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.session import Database
from slmops.server.reconcile import settle as settle_devices


def doc(temperature: float) -> Blueprint:
    body = spec() | {"generation": {"temperature": temperature}}
    return Blueprint.model_validate(
        {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": BLUEPRINT}}
        | {"spec": body}
    )


def temperatures(db: Database) -> set[float]:
    """The temperatures the lab devices' stored desired states say."""
    return {
        desired["generation"]["temperature"]
        for device_id, (desired, _) in stored(db).items()
        if device_id.startswith("dev-") and desired is not None
    }


def row(db: Database) -> BlueprintRow:
    with db.sessions() as s:
        found = s.scalar(select(BlueprintRow).where(BlueprintRow.name == BLUEPRINT))
        assert found is not None
        s.expunge(found)
        return found


def fleet(db: Database, ctx: Context) -> None:
    make_fleet(db, ctx)
    with db.sessions() as s:  # settle once, so every device has a stored desired state
        settle_devices(s, ctx)
    assert temperatures(db) == {0.2}


def put(
    session: Session, ctx: Context, temperature: float, lease: float = 60.0, actor: str = "op"
) -> service.Applied:
    return service.apply_blueprint(
        session,
        doc(temperature),
        actor=actor,
        contexts=lambda: ctx,
        lease_seconds=lease,
        wait=False,
    )


def sweep(db: Database, session: Session, ctx: Context) -> list[str]:
    """The ticker's sweep, waiting for the settles it starts (the ticker does not)."""
    return settle_behind(session, db.sessions, lambda: ctx, lease_seconds=1.0, wait=30)


def prefer(*lines: str) -> float | None:
    headers = [(b"prefer", line.encode("latin-1")) for line in lines]
    return async_wait(Request({"type": "http", "headers": headers}))


def test_prefer_header_parsing() -> None:
    assert prefer() is None and prefer("return=minimal") is None
    assert prefer("respond-async") == 0.0
    assert prefer("Respond-Async, wait=20") == 20.0
    assert prefer('wait="7";x=1, respond-async;foo') == 7.0
    assert prefer("respond-async", "wait=10") == 10.0  # several Prefer lines are one list
    assert prefer("respond-async, wait=100000") == MAX_WAIT
    assert prefer("respond-async, wait=-3") == 0.0  # not seconds: ignored
    assert prefer("respond-async, wait=\u00b2") == 0.0  # a digit to str.isdigit, not to float


def test_rows_inserted_without_an_apply_count_as_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    with database("sqlite", tmp_path, monkeypatch) as db:
        make_fleet(db, ctx)
        found = row(db)
        assert (found.generation, found.settled_generation) == (1, 1) and not settling(found)


def test_a_dead_settlers_apply_is_finished_by_the_ticker_once_its_lease_lapses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stored generation 2 and took the lease, then died before settling: nothing
    is settled while the lease runs; after it, the ticker's sweep settles it."""
    ctx = context(tmp_path)
    with database("sqlite", tmp_path, monkeypatch) as db:
        fleet(db, ctx)
        with db.sessions() as s:
            done = put(s, ctx, 0.7, lease=1.0)
            assert done.changed and done.token and done.devices is None
        behind = row(db)
        assert (behind.generation, behind.settled_generation) == (2, 1) and settling(behind)
        assert behind.applied_by == "op"
        with db.sessions() as s:
            assert sweep(db, s, ctx) == []  # the lease runs
        assert temperatures(db) == {0.2}
        time.sleep(1.1)
        with db.sessions() as s:
            assert sweep(db, s, ctx) == [BLUEPRINT]
        assert temperatures(db) == {0.7}
        after = row(db)
        assert after.settled_generation == 2 and after.settling_until is None
        assert after.settling_by is None and not settling(after)  # a late renewal cannot match
        with db.sessions() as s:  # nothing left behind: the next sweep does nothing
            assert sweep(db, s, ctx) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_apply_during_a_settle_is_taken_by_the_holder(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation 3 arrives while generation 2's settler holds the lease: it cannot claim,
    stores its spec, and the holder settles it before letting go: one settler, none lost."""
    ctx = context(tmp_path)
    with database(kind, tmp_path, monkeypatch) as db:
        fleet(db, ctx)
        with db.sessions() as holder, db.sessions() as other:
            first = put(holder, ctx, 0.5, actor="a")
            second = put(other, ctx, 0.9, actor="b")
            assert first.token and second.token is None
            with pytest.raises(service.Settling):  # a delete now could strand a rollout
                service.delete_blueprint(other, second.row, actor="c", ctx=ctx, lease_seconds=60)
            settle_claimed(
                holder, BLUEPRINT, first.token, actor="a", contexts=lambda: ctx, lease_seconds=60
            )
        assert temperatures(db) == {0.9}
        after = row(db)
        assert (after.generation, after.settled_generation) == (3, 3) and not settling(after)
        assert after.applied_by == "b"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_apply_that_read_a_stale_row_stores_a_new_generation(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B holds the row as it was at generation 1 when A stores generation 2: B's apply must
    store generation 3 (not a second "2" the settler would count as settled), and its spec is
    the one devices end up with."""
    ctx = context(tmp_path)
    with database(kind, tmp_path, monkeypatch) as db:
        fleet(db, ctx)
        with db.sessions() as a, db.sessions() as b:
            stale = service.find_blueprint(b, BLUEPRINT)
            b.commit()
            assert stale is not None and stale.generation == 1
            first = put(a, ctx, 0.5, actor="a")
            second = put(b, ctx, 0.9, actor="b")
            assert (first.row.generation, second.row.generation) == (2, 3)
            assert first.token is not None
            settle_claimed(
                a, BLUEPRINT, first.token, actor="a", contexts=lambda: ctx, lease_seconds=60
            )
        assert temperatures(db) == {0.9}
        assert row(db).settled_generation == 3


def broken_when(monkeypatch: pytest.MonkeyPatch, temperatures: set[float]) -> None:
    """Settling fails (in reconcile) while the stored spec's temperature is in the set."""
    real = settling_module.reconcile

    def reconcile(session: Session, bp_row: BlueprintRow, **kwargs: Any) -> str | None:
        if bp_row.spec["generation"]["temperature"] in temperatures:
            raise RuntimeError("registry unreadable")
        return real(session, bp_row, **kwargs)

    monkeypatch.setattr(settling_module, "reconcile", reconcile)


def test_a_failing_settle_is_recorded_retried_a_lease_later_and_deletable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    with database("sqlite", tmp_path, monkeypatch) as db:
        fleet(db, ctx)
        broken = {0.6, 0.8}
        broken_when(monkeypatch, broken)
        with db.sessions() as s:
            done = put(s, ctx, 0.6, lease=1.0)
            assert done.token is not None
            with pytest.raises(RuntimeError):
                settle_claimed(
                    s, BLUEPRINT, done.token, actor="op", contexts=lambda: ctx, lease_seconds=1.0
                )
        failed = row(db)
        assert failed.settle_error == "RuntimeError: registry unreadable"
        assert failed.settling_until is None and failed.settled_generation == 1
        assert not settling(failed)  # failed, not in progress: GET says why
        with db.sessions() as s:  # no retry sooner than a lease after the failure
            assert sweep(db, s, ctx) == []
        time.sleep(1.1)
        with db.sessions() as s:  # retried (in a thread of its own), fails again
            assert sweep(db, s, ctx) == [BLUEPRINT]
        assert row(db).settle_error and row(db).settled_generation == 1
        broken.clear()
        time.sleep(1.1)
        with db.sessions() as s:
            assert sweep(db, s, ctx) == [BLUEPRINT]
        fixed = row(db)
        assert fixed.settled_generation == 2 and fixed.settle_error is None
        assert temperatures(db) == {0.6}
        broken.add(0.8)
        with db.sessions() as s:  # a blueprint that cannot settle can still be deleted
            done = put(s, ctx, 0.8, lease=1.0)
            assert done.token is not None
            with pytest.raises(RuntimeError):
                settle_claimed(
                    s, BLUEPRINT, done.token, actor="op", contexts=lambda: ctx, lease_seconds=1.0
                )
            broken.clear()  # applying the same spec again retries at once (no lease to wait)
            again = service.apply_blueprint(
                s, doc(0.8), actor="op", contexts=lambda: ctx, lease_seconds=1.0
            )
            assert not again.changed and again.row.settled_generation == 3
            assert temperatures(db) == {0.8}
            broken.add(0.3)
            put(s, ctx, 0.3, lease=1.0)
            with pytest.raises(service.SettleFailed):  # a synchronous apply says it failed
                service.apply_blueprint(
                    s, doc(0.3), actor="op", contexts=lambda: ctx, lease_seconds=1.0
                )
            gone = service.find_blueprint(s, BLUEPRINT)
            assert gone is not None
            service.delete_blueprint(s, gone, actor="op", ctx=ctx, lease_seconds=1.0)
            assert service.find_blueprint(s, BLUEPRINT) is None


def test_a_failure_of_a_superseded_generation_is_not_the_newer_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation 2 fails while generation 3 was stored: the holder goes on to 3 and settles
    it; no error is left for 3, and nobody waits a lease for it."""
    ctx = context(tmp_path)
    with database("sqlite", tmp_path, monkeypatch) as db:
        fleet(db, ctx)
        broken_when(monkeypatch, {0.6})
        with db.sessions() as a, db.sessions() as b:
            first = put(a, ctx, 0.6)
            assert first.token is not None and put(b, ctx, 0.9).token is None
            settle_claimed(
                a, BLUEPRINT, first.token, actor="op", contexts=lambda: ctx, lease_seconds=60
            )
        after = row(db)
        assert (after.generation, after.settled_generation) == (3, 3)
        assert after.settle_error is None and temperatures(db) == {0.9}


def test_a_synchronous_holder_hands_newer_generations_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a request settles its generation 2, generation 3 is stored: the request returns
    once 2 is settled, and 3 goes on in a background thread (not in the ticker)."""
    ctx = context(tmp_path)
    with database("sqlite", tmp_path, monkeypatch) as db:
        fleet(db, ctx)
        real = settling_module.settle
        stored: list[int] = []

        def settle(session: Session, c: Context) -> Any:
            if not stored:  # another apply lands mid-settle
                with db.sessions() as other:
                    stored.append(put(other, ctx, 0.9).row.generation)
            return real(session, c)

        monkeypatch.setattr(settling_module, "settle", settle)
        with db.sessions() as s:
            mine = put(s, ctx, 0.5)
            assert mine.token is not None
            settle_claimed(
                s,
                BLUEPRINT,
                mine.token,
                actor="op",
                contexts=lambda: ctx,
                lease_seconds=60,
                until=2,
                sessions=db.sessions,
            )
        assert stored == [3] and row(db).settled_generation >= 2
        deadline = time.monotonic() + 20
        while row(db).settled_generation < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row(db).settled_generation == 3 and temperatures(db) == {0.9}


def test_a_delete_that_fails_lets_go_of_the_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    with database("sqlite", tmp_path, monkeypatch) as db:
        fleet(db, ctx)

        def stop(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("database went away")

        monkeypatch.setattr(service, "stop_for_blueprint", stop)
        with db.sessions() as s:
            found = service.find_blueprint(s, BLUEPRINT)
            assert found is not None
            with pytest.raises(RuntimeError):
                service.delete_blueprint(s, found, actor="op", ctx=ctx, lease_seconds=60)
        left = row(db)
        assert left.settling_until is None and left.settling_by is None
        with db.sessions() as s:
            assert claim(s, BLUEPRINT, 60) is not None


def test_a_holder_that_lost_its_lease_does_not_clear_the_next_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    with database("sqlite", tmp_path, monkeypatch) as db:
        fleet(db, ctx)
        with db.sessions() as s:
            stalled = put(s, ctx, 0.4, lease=0.5).token
            assert stalled is not None
            time.sleep(0.6)  # the holder stalled past its lease: the ticker takes it
            ticker = claim(s, BLUEPRINT, 60)
            s.commit()
            assert ticker is not None and ticker != stalled
            settle_claimed(  # the stalled holder wakes up and settles: it must not let go
                s, BLUEPRINT, stalled, actor="op", contexts=lambda: ctx, lease_seconds=0.5
            )
        held = row(db)
        assert held.settling_by == ticker and settling(held)
        with db.sessions() as s:
            assert claim(s, BLUEPRINT, 60) is None  # no third settler gets in


def test_exactly_one_of_many_claimants_takes_the_lease_on_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    with database("postgresql", tmp_path, monkeypatch) as db:
        make_fleet(db, ctx)
        barrier = threading.Barrier(8)
        won: list[str | None] = []

        def race() -> None:
            with db.sessions() as s:
                barrier.wait()
                won.append(claim(s, BLUEPRINT, 60))
                s.commit()

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(token is not None for token in won) == 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    yield from _server(tmp_path_factory, {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"})  # type: ignore[misc]


def hold_lease(server: Server, name: str, held: bool) -> None:
    """Another process's settle of ``name`` holds the lease (``held``), or has let go."""
    with sqlite3.connect(server.data / "slmops.db", timeout=10) as conn:
        until = "2099-01-01 00:00:00.000000" if held else None
        conn.execute(
            "UPDATE blueprints SET settling_until = ?, settling_by = ? WHERE name = ?",
            (until, "other" if held else None, name),
        )


def test_an_async_apply_answers_202_and_the_ticker_settles_it(
    server: Server, tmp_path: Path
) -> None:
    """``Prefer: respond-async`` while another process's settle holds the lease: 202 with
    Location at once, DELETE refused; once the lease is let go, the server's ticker settles the
    generation, and GET names the rollout it created."""
    push_version(server, tmp_path / "v1", "1.0.0")
    push_version(server, tmp_path / "v2", "2.0.0")
    enroll = enrollment_token(server, {"fleet": "async"})
    credential(server, enroll, "async-1", **FITS, labels={"site": "a"})
    operator = make_token(server, "operator")
    first = blueprint("fleet-async", {"fleet": "async"}, {"name": MODEL, "version": "1.0.0"})
    assert apply(server, write(tmp_path / "a.yaml", first), operator).returncode == 0
    hold_lease(server, "fleet-async", True)
    headers = {"Authorization": f"Bearer {operator}", "Prefer": "respond-async"}
    second = blueprint("fleet-async", {"fleet": "async"}, {"name": MODEL, "version": "2.0.0"})
    url = f"{server.url}/api/v1/blueprints/fleet-async"
    r = httpx.put(url, json=second, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == "/api/v1/blueprints/fleet-async"
    assert r.headers["preference-applied"] == "respond-async"
    body = r.json()
    assert body["generation"] == 2 and body["settled_generation"] == 1 and body["settling"]
    assert body["devices"] is None and body["rollout"] is None
    refused = httpx.delete(url, headers=headers, timeout=30)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "settling"
    time.sleep(1.0)  # ticks go by: nothing settles while the lease is held
    assert httpx.get(url, headers=headers, timeout=10).json()["settled_generation"] == 1
    hold_lease(server, "fleet-async", False)
    deadline = time.monotonic() + 30
    while True:
        got = httpx.get(url, headers=headers, timeout=10).json()
        if got["settled_generation"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got["settled_generation"] == 2 and not got["settling"]
    rollout = httpx.get(
        f"{server.url}/api/v1/rollouts/{got['settled_rollout']}?limit=0", headers=headers
    ).json()
    assert rollout["target_version"] == "2.0.0" and rollout["blueprint"] == "fleet-async"
    again = httpx.put(url, json=second, headers=headers, timeout=30)  # unchanged: nothing to do
    assert again.status_code == 200 and again.json()["changed"] is False

    # the CLI: --no-wait answers once stored; by default it waits (here: within the server's
    # wait, so 200 with the device count and the rollout)
    third = blueprint("fleet-async", {"fleet": "async"}, {"name": MODEL, "version": "1.0.0"})
    res = apply(server, write(tmp_path / "c.yaml", third), operator, "--no-wait")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["generation"] == 3 and out["changed"] is True
    waited = apply(server, write(tmp_path / "d.yaml", second), operator)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    done = json.loads(waited.stdout)
    assert done["generation"] == 4 and done["settled_generation"] == 4
    assert done["devices"] == 1 and done["rollout"] == done["settled_rollout"] is not None
