"""The check-in cache hit answered before routing (server/api/device/fast_checkin.py).

A real uvicorn on 127.0.0.1 serves the app in this process (real SQLite), so the test can
count, beside what the client sees, the cache's hit counter and the route's calls (the route's
``answer`` is wrapped): an idle poll repeating the last full check-in gets 304 without reaching
the route, with the headers the route would send; everything else (other bytes, another ETag,
a body over the limit, read in chunks) reaches the route with its body intact; a revoked
device is refused on its very next poll. The credential and the body are hashed once per
request (counted at ``checkin``'s ``hash_secret`` and ``hashlib``, the one seam both layers
hash through), with this layer and without it (an app built without the middleware).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import inventory
from factories.inproc import served_in_thread
from factories.server import Server, cli_json, credential, enrollment_token, make_token
from slmops.server.api.device import checkin
from slmops.server.api.device.checkin_cache import CheckinCache
from slmops.server.api.device.fast_checkin import FastCheckin
from slmops.server.app import create_app
from slmops.server.settings import load_settings


class Served:
    """The in-process server, its app's check-in cache, and how often the route answered."""

    def __init__(self, server: Server, cache: CheckinCache, calls: list[int]) -> None:
        self.server, self.cache, self.calls = server, cache, calls

    def poll(self, cred: str, body: Any, etag: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {cred}", "Content-Type": "application/json"}
        if etag is not None:
            headers["If-None-Match"] = etag
        url = self.server.url + "/device/v1/checkin"
        return httpx.post(url, content=body, headers=headers, timeout=10)


def _serve(data: Path, *, fast: bool = True) -> Iterator[Served]:
    """``create_app`` on a real uvicorn; ``fast=False`` builds it without ``FastCheckin``."""
    admin = cli_json("token", "create", "--data", data, "--role", "admin", "--name", "root")
    settings = load_settings(data_dir=data, checkin_cache_seconds=30, poll_seconds=60)
    app = create_app(settings)
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastCheckin]
    with served_in_thread(app) as (url, calls):
        yield Served(Server(url, data, admin["token"]), app.state.checkin_cache, calls)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp("fast"))


def _body(**inv: Any) -> bytes:
    return json.dumps({"schema": "slmops.device/v1", "inventory": inventory(**inv)}).encode()


def _chunks(raw: bytes, size: int) -> Iterator[bytes]:
    yield from (raw[i : i + size] for i in range(0, len(raw), size))


def _shown(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k not in ("date", "server")}


def test_an_idle_poll_is_answered_without_reaching_the_route(served: Served) -> None:
    token = enrollment_token(served.server, {"site": "fast"})
    cred = credential(served.server, token, "fast-1")
    raw = _body()
    first = served.poll(cred, raw)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    # The first full answer is cached (its own commit does not keep it out): a hit already.
    hits = served.cache.hits
    assert served.poll(cred, raw, etag).status_code == 304
    assert served.cache.hits == hits + 1
    calls = len(served.calls)
    hits, misses = served.cache.hits, served.cache.misses

    fast = served.poll(cred, raw, etag)
    assert fast.status_code == 304 and fast.content == b""
    assert _shown(fast) == {"etag": etag, "cache-control": "no-cache"}
    chunked = served.poll(cred, _chunks(raw, 7), f"W/{etag}")  # read in pieces, weak ETag
    assert chunked.status_code == 304 and chunked.headers["etag"] == etag
    assert len(served.calls) == calls  # the route never ran
    assert (served.cache.hits, served.cache.misses) == (hits + 2, misses)

    # Other bytes for the same report: a miss, the route answers 304 from the stored row, with
    # the same headers as the fast path; the miss is counted once.
    spaced = raw.replace(b":", b": ")
    slow = served.poll(cred, spaced, etag)
    assert slow.status_code == 304 and _shown(slow) == _shown(fast)
    assert len(served.calls) == calls + 1 and served.cache.misses == misses + 1

    # Another ETag: the route answers the full state, from the same body bytes.
    full = served.poll(cred, _chunks(raw, 5), '"stale"')
    assert full.status_code == 200 and full.headers["etag"] == etag
    assert full.content == first.content
    assert len(served.calls) == calls + 2


def test_bodies_over_the_limit_and_bad_credentials_get_the_route_s_answer(
    served: Served,
) -> None:
    cred = credential(served.server, enrollment_token(served.server, {}), "fast-2")
    big = b" " * (checkin.MAX_BODY_BYTES + 10) + _body()
    for content in (big, _chunks(big, 64 * 1024)):  # declared length; chunked, read partly
        r = served.poll(cred, content, '"x"')
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    r = served.poll("not-a-credential", _body(), '"x"')
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_a_revoked_device_is_refused_on_its_next_poll(served: Served) -> None:
    token = enrollment_token(served.server, {"site": "gone"})
    cred = credential(served.server, token, "fast-3")
    raw = _body()
    etag = served.poll(cred, raw).headers["etag"]
    assert served.poll(cred, raw, etag).status_code == 304  # cached by the route
    hits = served.cache.hits
    assert served.poll(cred, raw, etag).status_code == 304
    assert served.cache.hits == hits + 1  # answered from the cache
    with served.server.client(make_token(served.server, "operator")) as c:
        assert c.post("/api/v1/devices/fast-3/revoke").status_code == 200
    r = served.poll(cred, raw, etag)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert served.cache.hits == hits + 1


class Hashes:
    """Counts the credential and body hashes ``checkin`` computes (both layers call it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.key = self.body = 0
        real_secret = checkin.hash_secret

        def hash_secret(*args: Any) -> str:
            self.key += 1
            return real_secret(*args)

        def sha256(data: bytes) -> Any:
            self.body += 1
            return hashlib.sha256(data)

        monkeypatch.setattr(checkin, "hash_secret", hash_secret)
        monkeypatch.setattr(checkin, "hashlib", type("counted", (), {"sha256": sha256}))

    def take(self) -> tuple[int, int]:
        """(credential hashes, body hashes) since the last call."""
        seen, self.key, self.body = (self.key, self.body), 0, 0
        return seen


def _each_request_hashes_once(served: Served, hashes: Hashes, name: str) -> None:
    cred = credential(served.server, enrollment_token(served.server, {}), name)
    raw = _body()
    calls = len(served.calls)
    hashes.take()
    first = served.poll(cred, raw, '"none"')  # a miss (the fast path, if any, looked first)
    assert first.status_code == 200, first.text
    assert hashes.take() == (1, 1) and len(served.calls) == calls + 1
    etag = first.headers["etag"]
    hits = served.cache.hits
    assert served.poll(cred, raw, etag).status_code == 304  # a hit
    assert hashes.take() == (1, 1) and served.cache.hits == hits + 1
    assert served.poll(cred, raw).status_code == 200  # no ETag: only the route looks
    assert hashes.take() == (1, 1)
    assert served.poll(cred, _chunks(raw, 9), '"old"').status_code == 200  # chunked miss
    assert hashes.take() == (1, 1)


def test_a_miss_hashes_the_credential_and_the_body_once(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    _each_request_hashes_once(served, Hashes(monkeypatch), "hash-1")


def test_the_route_hashes_for_itself_without_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for plain in _serve(tmp_path, fast=False):
        hits = plain.cache.hits
        _each_request_hashes_once(plain, Hashes(monkeypatch), "hash-2")
        assert len(plain.calls) == 4  # every poll, the hit too, was the route's
        assert plain.cache.hits == hits + 1
