"""A malicious control plane cannot make the agent write outside its data dir (issue 11, #3).

Before: ``DesiredModel.manifest_digest`` was any string, and ``sha256:../..`` or
``sha256:/abs/path`` became the staging folder, where a server-chosen blob was written before the
signature check. Now every wire digest is one pattern (protocol/digest.py) and every path built
from server data goes through ``safe_join`` (core/safepath.py).

The control plane here is a real HTTP server on 127.0.0.1 that answers enrollment and check-in
with a crafted desired state and serves a "blob" to anyone who asks for one.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from slmops.agent.config import AgentConfig
from slmops.agent.daemon import STATUS_FILE, Agent
from slmops.agent.fetch import RegistrySource
from slmops.agent.install import Installer
from slmops.agent.transport import FakeTransport, reply
from slmops.core.safepath import PathEscapeError, safe_join
from slmops.protocol.device import ActiveModel, DesiredModel
from slmops.protocol.digest import is_digest
from slmops.protocol.fleet import DeviceActionState as S

GOOD = "sha256:" + "ab" * 32
EVIL = [
    "sha256:../../escaped",
    "sha256:/tmp/slmops-escaped",
    "sha256:" + "ab" * 32 + "\n",  # `$` would have let this one through
    "sha256:" + "AB" * 32,
    "sha256:" + "ab" * 31,
    "../" + "ab" * 32,
]


@pytest.mark.parametrize("bad", EVIL)
def test_every_wire_digest_field_refuses_a_malformed_digest(bad: str) -> None:
    assert not is_digest(bad)
    base = {
        "name": "m",
        "version": "1",
        "variant": "v",
        "bundle_digest": GOOD,
        "manifest_digest": GOOD,
        "repository": "acme/bot",
    }
    DesiredModel.model_validate(base)
    for field in ("bundle_digest", "manifest_digest"):
        with pytest.raises(ValidationError, match="malformed digest"):
            DesiredModel.model_validate({**base, field: bad})
    with pytest.raises(ValidationError, match="malformed digest"):
        ActiveModel(name="m", version="1", variant="v", digest=bad)


def test_safe_join_keeps_paths_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    assert safe_join(root, "sub", "x") == (root / "sub" / "x").resolve()
    for parts in [("..", "x"), ("/etc/passwd",), ("sub/../../x",), ("a\x00b",)]:
        with pytest.raises(PathEscapeError):
            safe_join(root, *parts)
    (root / "link").symlink_to(tmp_path)  # a symlink inside that points outside
    with pytest.raises(PathEscapeError, match="resolves outside"):
        safe_join(root, "link", "x")


class _EvilPlane(BaseHTTPRequestHandler):
    """Enrolls anyone; answers every check-in with the digest under test; logs registry hits."""

    digest = ""
    generation: ClassVar[dict[str, Any]] = {}
    registry_hits: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/device/v1/enroll":
            self._json(200, {"device_id": "box-1", "credential": "c" * 40})
        elif self.path == "/device/v1/checkin":
            model = {
                "name": "acme/bot",
                "version": "6.6.6",
                "variant": "evil",
                "bundle_digest": self.digest,
                "manifest_digest": self.digest,
                "repository": "acme/bot",
                "rollout_id": "r1",
            }
            desired = {
                "schema": "slmops.device/v1",
                "device_id": "box-1",
                "model": model if self.digest else None,
                "generation": self.generation,
            }
            self._json(200, desired)
        else:
            self._json(204, {})

    def do_GET(self) -> None:
        type(self).registry_hits.append(self.path)
        self._json(200, {"payload": "written by the server"})


@pytest.fixture
def evil_plane() -> Iterator[tuple[str, type[_EvilPlane]]]:
    handler = type("Plane", (_EvilPlane,), {"registry_hits": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("bad", EVIL[:3])
def test_agent_refuses_a_desired_state_that_escapes_its_data_dir(
    evil_plane: tuple[str, type[_EvilPlane]], tmp_path: Path, bad: str
) -> None:
    url, handler = evil_plane
    handler.digest = bad
    data = tmp_path / "box" / "data"
    cfg = AgentConfig(
        server=url, data_dir=data, enroll_token="token-123456", api_port=0, device_id="box-1"
    )
    agent = Agent(cfg)
    agent.start()
    try:
        agent.step()
        status = json.loads((data / STATUS_FILE).read_text())
    finally:
        agent.close()
    assert status["state"] == "backoff" and "malformed digest" in status["error"], status
    assert handler.registry_hits == [], "nothing was downloaded"
    outside = _files(tmp_path) - {f"box/data/{f}" for f in _files(data)} - {"box", "box/data"}
    assert outside == set(), f"written outside the data dir: {outside}"
    assert not Path("/tmp/slmops-escaped").exists()
    assert not any("escaped" in f for f in _files(data))


@pytest.mark.parametrize("bad", EVIL[:2])
def test_installer_refuses_an_escaping_digest_even_unvalidated(tmp_path: Path, bad: str) -> None:
    """Second line: a DesiredModel built without validation still cannot leave staging/."""
    transport = FakeTransport(lambda req: reply(200, b"{}"))
    source = RegistrySource("http://127.0.0.1:9", "acme/bot", transport=transport)
    want = DesiredModel.model_construct(
        name="acme/bot",
        version="1",
        variant="v",
        bundle_digest=bad,
        manifest_digest=bad,
        repository="acme/bot",
        rollout_id="r1",
        revert=False,
    )
    seen: list[Any] = []
    data = tmp_path / "data"
    final = Installer(data, {}, threads=1).apply(want, source, seen.append)
    assert final.state is S.FAILED and "malformed" in final.detail, final
    assert transport.requests == []
    assert _files(tmp_path) <= {"data", *(f"data/{f}" for f in _files(data))}
    assert not os.path.exists("/tmp/slmops-escaped")


def test_agent_api_key_comes_from_the_desired_state(
    evil_plane: tuple[str, type[_EvilPlane]], tmp_path: Path
) -> None:
    """The blueprint's generation settings carry an optional API key; once the agent has it,
    its local API answers 401 without ``Authorization: Bearer <key>``, on /v1/models too."""
    import httpx

    url, handler = evil_plane
    key = "blueprint-key-" + "q" * 20
    handler.generation = {"api_key": key}
    cfg = AgentConfig(
        server=url, data_dir=tmp_path / "data", enroll_token="token-123456", api_port=0
    )
    agent = Agent(cfg)
    agent.start()
    try:
        assert agent.api is not None
        models = f"http://127.0.0.1:{agent.api.server_address[1]}/v1/models"
        assert httpx.get(models).status_code == 200, "no key before the first check-in"
        agent.step()
        assert httpx.get(models).status_code == 401
        ok = httpx.get(models, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["data"] == []
    finally:
        agent.close()
