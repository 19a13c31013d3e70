"""A device's first full check-in is cached; a real change is never served from the cache.

The check-in cache refuses an answer when an invalidation arrived while it was computed
(``CheckinCache.put``'s epoch). A device's first full check-in writes its own desired state
(and on PostgreSQL hears that write back as a NOTIFY), and both used to count as such an
invalidation, so a device was cached only from its second poll: a 100k fleet's first round
after every change was twice the full check-ins. Now a check-in's own commits and this
process's own NOTIFYs do not count, and everything else still does.

A real uvicorn on 127.0.0.1 serves ``create_app`` in this process, once on SQLite and once on
a throwaway PostgreSQL (``tests/pg.py``), so the test can count the route's calls (``answer``
wrapped) beside what the client sees: the second poll is a hit answered before routing; an
apply, an operator's label change or a revoke between the polls, or an apply racing the first
check-in itself, is answered with the new state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import inventory
from factories.inproc import served_in_thread
from factories.server import Server, credential, enrollment_token, make_token
from slmops.server.api.device import checkin
from slmops.server.api.device.checkin_cache import CheckinCache
from slmops.server.app import create_app
from slmops.server.invalidation import Invalidation
from slmops.server.settings import load_settings


class Served:
    """The in-process server, its app's cache and invalidation, and the route's calls."""

    def __init__(self, server: Server, app: Any, calls: list[int], backend: str) -> None:
        self.server, self.app, self.calls, self.backend = server, app, calls, backend
        self.cache: CheckinCache = app.state.checkin_cache
        self.invalidation: Invalidation = app.state.invalidation

    def poll(self, cred: str, body: bytes, etag: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {cred}", "Content-Type": "application/json"}
        if etag is not None:
            headers["If-None-Match"] = etag
        url = self.server.url + "/device/v1/checkin"
        return httpx.post(url, content=body, headers=headers, timeout=10)

    def operator(self) -> httpx.Client:
        return self.server.client(make_token(self.server, "operator"))

    def settle(self, echoes: int) -> None:
        """On PostgreSQL, wait until this process heard its own NOTIFY back (the one that used
        to drop the entry the first check-in had just cached)."""
        if self.backend != "postgresql":
            return
        deadline = time.monotonic() + 5
        while self.invalidation.echoes <= echoes:
            assert time.monotonic() < deadline, "this process's own NOTIFY never came back"
            time.sleep(0.01)


def _admin(data: Path, db_url: str | None) -> str:
    env = {**os.environ, **({"SLMOPS_DB_URL": db_url} if db_url else {})}
    args = ["token", "create", "--data", str(data), "--role", "admin", "--name", "root", "--json"]
    res = subprocess.run(
        [sys.executable, "-m", "slmops.cli.server", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    token: str = json.loads(res.stdout)["token"]
    return token


def _serve(data: Path, db_url: str | None, backend: str) -> Iterator[Served]:
    settings = load_settings(
        data_dir=data, db_url=db_url, checkin_cache_seconds=30, poll_seconds=60
    )
    app = create_app(settings)
    with served_in_thread(app) as (url, calls):
        yield Served(Server(url, data, _admin(data, db_url)), app, calls, backend)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    data = tmp_path_factory.mktemp(f"first-{request.param}")
    if request.param == "sqlite":
        yield from _serve(data, None, "sqlite")
        return
    from pg import postgres_cluster

    with postgres_cluster() as url:
        yield from _serve(data, url, "postgresql")


def _body(**labels: str) -> bytes:
    inv = inventory(labels=labels)
    return json.dumps({"schema": "slmops.device/v1", "inventory": inv}).encode()


def _device(served: Served, name: str, **labels: str) -> tuple[str, bytes]:
    """A freshly enrolled device ``name`` (reporting ``labels``): its credential and body."""
    cred = credential(served.server, enrollment_token(served.server, {}), name, labels=labels)
    return cred, _body(**labels)


def _first(served: Served, cred: str, raw: bytes) -> str:
    """The device's first check-in (a full one): its ETag."""
    echoes = served.invalidation.echoes
    first = served.poll(cred, raw)
    assert first.status_code == 200, first.text
    assert not first.json().get("unplaceable")
    served.settle(echoes)
    return first.headers["etag"]


def _apply(served: Served, name: str, selector: dict[str, str]) -> None:
    doc = {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": name}}
    spec = {"selector": selector, "model": {"name": "assistant", "channel": "x"}}
    with served.operator() as c:
        r = c.put(f"/api/v1/blueprints/{name}", json=doc | {"spec": spec})
    assert r.status_code < 300, r.text


def test_the_second_poll_after_a_first_full_checkin_is_a_hit(served: Served) -> None:
    cred, raw = _device(served, "first-1", site="first")
    etag = _first(served, cred, raw)
    calls, hits = len(served.calls), served.cache.hits
    second = served.poll(cred, raw, etag)
    assert second.status_code == 304 and second.headers["etag"] == etag
    assert served.cache.hits == hits + 1  # from the entry the first check-in left
    assert len(served.calls) == calls  # answered before routing


def _assert_new_state(served: Served, r: httpx.Response, etag: str) -> None:
    assert r.status_code == 200, r.text
    assert r.headers["etag"] != etag
    assert "assistant" in r.json()["unplaceable"]


def test_an_apply_between_the_polls_is_answered(served: Served) -> None:
    cred, raw = _device(served, "apply-1", site="apply")
    etag = _first(served, cred, raw)
    _apply(served, "apply", {"site": "apply"})
    _assert_new_state(served, served.poll(cred, raw, etag), etag)


def test_an_operator_label_change_between_the_polls_is_answered(served: Served) -> None:
    _apply(served, "gold", {"tier": "gold"})  # governs nobody yet
    cred, raw = _device(served, "label-1", site="label")
    etag = _first(served, cred, raw)
    with served.operator() as c:
        r = c.patch("/api/v1/devices/label-1/labels", json={"set": {"tier": "gold"}})
    assert r.status_code == 200, r.text
    _assert_new_state(served, served.poll(cred, raw, etag), etag)


def test_a_revoke_between_the_polls_is_refused(served: Served) -> None:
    cred, raw = _device(served, "revoke-1", site="revoke")
    etag = _first(served, cred, raw)
    with served.operator() as c:
        assert c.post("/api/v1/devices/revoke-1/revoke").status_code == 200
    r = served.poll(cred, raw, etag)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_an_apply_racing_the_first_checkin_is_not_cached(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The apply commits after the first check-in computed its answer and before the answer
    is cached: the cache must refuse it (it is the old state), so the next poll is told."""
    cred, raw = _device(served, "race-1", site="race")
    real: Callable[..., checkin.Answer] = checkin.record_checkin

    def racing(session: Any, device: Any, *args: Any, **kwargs: Any) -> checkin.Answer:
        result = real(session, device, *args, **kwargs)
        if result.device_id == "race-1":
            _apply(served, "race", {"site": "race"})  # from this worker thread, over HTTP
        return result

    monkeypatch.setattr(checkin, "record_checkin", racing)
    first = served.poll(cred, raw)
    assert first.status_code == 200 and not first.json().get("unplaceable")
    etag = first.headers["etag"]
    monkeypatch.undo()
    calls = len(served.calls)
    _assert_new_state(served, served.poll(cred, raw, etag), etag)
    assert len(served.calls) == calls + 1  # a miss: the route answered
