"""Cross-process invalidation of cached check-ins (server/invalidation.py).

The main test runs two real `slmops server run` processes on one real PostgreSQL: a device polls
process B with its ETag (B answers from its check-in cache, whose entries here would live 30 s),
an operator changes something through process A, and B must answer the new state within 2 s
(a blueprint apply: new desired state; a revoke: 401). The rest checks the pieces in-process:
the NOTIFY payload, the cache dropping per device or all, a check-in that read before an
invalidation not caching what it read, and a rollback dropping nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from helpers import free_port
from slmops.server.api.device.checkin_cache import LISTENING_TTL, CheckinCache, Entry
from slmops.server.invalidation import (
    EVERYTHING,
    MAX_PAYLOAD,
    Invalidation,
    changed,
    notify_on_commit,
    own_drops,
    parse_payload,
    payload_of,
    split_origin,
    tagged,
)

CLI = [sys.executable, "-m", "slmops.cli.server"]
CACHE_SECONDS = "30"  # without invalidation, B would answer stale for up to this long


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    from pg import postgres_cluster

    with postgres_cluster() as url:
        yield url


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "SLMOPS_DB_URL": url, "SLMOPS_CHECKIN_CACHE_SECONDS": CACHE_SECONDS}


def _cli(data: Path, url: str, *args: str) -> dict[str, Any]:
    res = subprocess.run(
        [*CLI, *args, "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        env=_env(url),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def _start(data: Path, url: str) -> tuple[subprocess.Popen[bytes], str]:
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with (data / "server.log").open("a") as log:
        proc = subprocess.Popen(
            [*CLI, "run", "--data", str(data), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(url),
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (data / "server.log").read_text()[-2000:]
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)


INVENTORY: dict[str, Any] = {
    "arch": "aarch64",
    "cores": 4,
    "ram_bytes": 8 << 30,
    "free_disk_bytes": 20 << 30,
    "runtimes": ["gguf"],
    "agent_version": "0.1.0",
    "model_ram_bytes": 2 << 30,
    "model_cores": 2,
    "profile": "rpi5",
    "labels": {"site": "lab"},
}
BODY = json.dumps({"schema": "slmops.device/v1", "inventory": INVENTORY})


def _poll(client: httpx.Client, base: str, auth: str, etag: str) -> httpx.Response:
    headers = {"Authorization": auth, "If-None-Match": etag, "Content-Type": "application/json"}
    return client.post(base + "/device/v1/checkin", content=BODY, headers=headers)


def _until_not_304(client: httpx.Client, base: str, auth: str, etag: str) -> tuple[float, Any]:
    """Poll every 20 ms until the answer is no longer 304; seconds taken and the answer."""
    start = time.monotonic()
    while time.monotonic() - start < 20:
        r = _poll(client, base, auth, etag)
        if r.status_code != 304:
            return time.monotonic() - start, r
        time.sleep(0.02)
    raise AssertionError("process B kept answering 304 for 20 s")


def test_a_change_through_one_process_reaches_a_device_polling_another(
    tmp_path: Path, pg_url: str
) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        a, url_a = _start(tmp_path / "a", pg_url)  # a migrates the database
        procs.append(a)
        b, url_b = _start(tmp_path / "b", pg_url)
        procs.append(b)
        admin = _cli(tmp_path / "a", pg_url, "token", "create", "--role", "admin")["token"]
        op = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(timeout=10) as c:
            token = c.post(url_a + "/api/v1/enrollment-tokens", json={}, headers=op)
            enroll = {
                "enrollment_token": token.json()["token"],
                "device_id": "dev-1",
                "inventory": INVENTORY,
            }
            r = c.post(url_b + "/device/v1/enroll", json=enroll)
            assert r.status_code == 201, r.text
            auth = "Bearer " + r.json()["credential"]
            first = _poll(c, url_b, auth, '"none"')
            assert first.status_code == 200, first.text
            etag = first.headers["etag"]
            assert first.json().get("model") is None and not first.json().get("unplaceable")
            for _ in range(5):  # idle polls: B caches the answer (fresh entry, 30 s to live)
                assert _poll(c, url_b, auth, etag).status_code == 304

            # An operator applies a blueprint through A: the device's desired state changes
            # (its model cannot be resolved: it is told why).
            doc = {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": "lab"}}
            spec = {"selector": {"site": "lab"}, "model": {"name": "assistant", "channel": "x"}}
            applied = c.put(url_a + "/api/v1/blueprints/lab", json=doc | {"spec": spec}, headers=op)
            assert applied.status_code < 300, applied.text
            took, r = _until_not_304(c, url_b, auth, etag)
            assert r.status_code == 200, r.text
            assert "assistant" in r.json()["unplaceable"]
            assert r.headers["etag"] != etag
            assert took < 2.0, f"B answered the new desired state after {took:.2f} s"
            print(f"apply through A reached a device polling B after {took:.3f} s")
            etag = r.headers["etag"]
            for _ in range(3):
                assert _poll(c, url_b, auth, etag).status_code == 304

            # Revoked through A: B stops answering the old credential at once.
            r = c.post(url_a + "/api/v1/devices/dev-1/revoke", json={}, headers=op)
            assert r.status_code < 300, r.text
            took, r = _until_not_304(c, url_b, auth, etag)
            assert r.status_code == 401, r.text
            assert took < 2.0, f"B still served a revoked credential {took:.2f} s later"
            print(f"revoke through A refused on B after {took:.3f} s")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=15)


# --- the pieces, in-process ----------------------------------------------------------------------


def test_payload_names_devices_or_everything() -> None:
    assert payload_of({"b", "a"}) == "a,b"
    assert parse_payload("a,b") == {"a", "b"}
    assert payload_of({"a", EVERYTHING}) == EVERYTHING
    many = {f"device-{i:06d}" for i in range(MAX_PAYLOAD // 10)}
    assert payload_of(many) == EVERYTHING  # too long for one NOTIFY
    assert parse_payload(EVERYTHING) is None
    assert parse_payload("") is None
    # an API process tags what it sends, so its listener can skip its own; the tag is a last
    # item no device id can be, so an older reader still drops the ids; "*" stays untagged
    assert tagged("0af3", {"b", "a"}) == "a,b,@0af3"
    assert split_origin("a,b,@0af3") == ("0af3", "a,b") and split_origin("a,b") == (None, "a,b")
    assert parse_payload(tagged("0af3", {"a"})) == {"a"}
    assert tagged("0af3", {EVERYTHING}) == EVERYTHING and split_origin(EVERYTHING)[0] is None


def _entry(device_id: str) -> Entry:
    return Entry(device_id, '"e"', b"d", time.time(), time.time() + 60)


def test_cache_drops_per_device_and_refuses_what_was_read_before_an_invalidation() -> None:
    inv = Invalidation()
    cache = CheckinCache(5.0, inv)
    now = time.time()
    epoch = cache.epoch
    cache.put("k1", _entry("d1"), epoch=epoch)
    cache.put("k2", _entry("d2"), epoch=epoch)
    assert cache.hit("k1", b"d", '"e"', now, 30) and cache.hit("k2", b"d", '"e"', now, 30)
    inv.drop({"d1"})
    assert not cache.hit("k1", b"d", '"e"', now, 30)
    assert cache.hit("k2", b"d", '"e"', now, 30)
    # read before that invalidation: not cached
    cache.put("k1", _entry("d1"), epoch=epoch)
    assert not cache.hit("k1", b"d", '"e"', now, 30)
    # a new credential for the same device replaces its old entry
    cache.put("k3", _entry("d2"), epoch=cache.epoch)
    assert not cache.hit("k2", b"d", '"e"', now, 30) and len(cache) == 1
    inv.drop(None)
    assert len(cache) == 0
    assert cache.ttl == 5.0
    inv.live = True  # a listener hears the other processes: entries may live longer
    assert cache.ttl == LISTENING_TTL
    assert CheckinCache(0, inv).ttl == 0  # off stays off


def test_committed_changes_drop_and_rolled_back_ones_do_not(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    sessions = sessionmaker(engine)
    inv = Invalidation()
    dropped: list[set[str] | None] = []
    inv.subscribe(dropped.append)
    notify_on_commit(sessions, engine)
    inv.install(sessions)
    with sessions() as s:
        s.execute(text("SELECT 1"))
        changed(s, "d1")
        s.rollback()
        s.execute(text("SELECT 1"))
        s.commit()
        assert dropped == [] and own_drops(s) == 0
        s.execute(text("SELECT 1"))
        changed(s, "d1")
        nested = s.begin_nested()  # a savepoint rolled back keeps the outer one's changes
        changed(s, "d2")  # (and its own: dropping too much is safe, too little is not)
        nested.rollback()
        s.commit()
        assert dropped == [{"d1", "d2"}]
        assert own_drops(s) == 1 and inv.epoch == 1  # a check-in's own: not a change it missed
        s.execute(text("SELECT 1"))
        changed(s, None)
        s.commit()
        assert dropped[-1] is None
    inv.listen(engine)  # SQLite: no listener thread, entries keep the short lifetime
    assert not inv.wait_live(0.1)
    engine.dispose()


def test_listener_hears_commits_only_and_comes_back_after_its_connection_dies(
    pg_url: str,
) -> None:
    """In-process, on PostgreSQL: one engine commits, another's listener hears it; a rolled-back
    change is never heard; a listener whose backend is killed reconnects and drops everything."""
    writer_engine = create_engine(pg_url)
    listener_engine = create_engine(pg_url)
    sessions = sessionmaker(writer_engine)
    notify_on_commit(sessions, writer_engine)
    inv = Invalidation()
    heard: list[set[str] | None] = []
    inv.subscribe(heard.append)
    inv.listen(listener_engine)
    try:
        assert inv.wait_live(10)
        heard.clear()

        def until(what: str, check: Any) -> None:
            deadline = time.monotonic() + 5
            while not check():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.01)

        with sessions() as s:
            s.execute(text("SELECT 1"))
            changed(s, "gone")
            s.rollback()
            s.execute(text("SELECT 1"))
            changed(s, "dev-7")
            s.commit()
        until("the notification", lambda: {"dev-7"} in heard)
        assert all(h is None or "gone" not in h for h in heard)

        with listener_engine.connect() as c:  # kill the listener's backend
            c.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            )
        until("the listener to notice", lambda: None in heard)
        until("the listener to come back", lambda: inv.live)
        heard.clear()
        with sessions() as s:
            s.execute(text("SELECT 1"))
            changed(s, "dev-8")
            s.commit()
        until("a notification after the reconnect", lambda: {"dev-8"} in heard)
    finally:
        inv.stop()
        writer_engine.dispose()
        listener_engine.dispose()


def test_a_device_polling_less_often_than_last_seen_is_written_still_hits() -> None:
    """A fleet polling each minute: ``last_seen`` is due at every poll (written at most every
    30 s), which used to send every poll past the cache. With the check-in reader's buffered
    write (``seen``) the entry answers, the write is handed over and the entry's clock restarts;
    without it the route must write, so it is a miss."""
    inv = Invalidation()
    cache = CheckinCache(5.0, inv, listening_ttl=180.0)
    now = time.time()
    cache.put("k1", Entry("d1", '"e"', b"d", now - 45, now + 60), epoch=cache.epoch)
    assert not cache.hit("k1", b"d", '"e"', now, 30)  # due, and nobody to write it
    written: list[tuple[str, float]] = []
    assert cache.hit("k1", b"d", '"e"', now, 30, seen=lambda d, t: written.append((d, t)))
    assert written == [("d1", now)]
    assert cache.hit("k1", b"d", '"e"', now + 1, 30, seen=lambda d, t: written.append((d, t)))
    assert written == [("d1", now)]  # the clock restarted: not due again
    assert not cache.hit("k1", b"d", '"other"', now + 1, 30, seen=lambda d, t: None)
    inv.live = True
    assert cache.ttl == 180.0  # entries outlive a minute's poll while NOTIFY keeps them current
