"""A real `slmops server run` subprocess on 127.0.0.1 and the device/operator calls every server
suite makes: tokens, enrollment, credentials, the error envelope.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import inventory  # re-exported: the server suites take it from here
from helpers import free_port
from slmops.protocol.device import EnrollResponse

CLI = [sys.executable, "-m", "slmops.cli.server"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def cli_json(*args: str | Path) -> dict[str, Any]:
    res = cli(*args, "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


@dataclass
class Server:
    url: str
    data: Path
    admin: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


def _server(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Start `slmops server run`; ``env`` adds variables to the server process's environment."""
    data = tmp_path_factory.mktemp("server")
    admin = cli_json("token", "create", "--data", data, "--role", "admin", "--name", "root")
    port = free_port()
    log = (data / "server.log").open("w")
    proc = subprocess.Popen(
        [*CLI, "run", "--data", str(data), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env} if env else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start: " + (data / "server.log").read_text())
            time.sleep(0.1)
        yield Server(url, data, admin["token"])
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def make_token(server: Server, role: str) -> str:
    with server.client(server.admin) as c:
        r = c.post("/api/v1/tokens", json={"name": f"t-{role}", "role": role})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def enrollment_token(server: Server, labels: dict[str, str]) -> str:
    with server.client(make_token(server, "operator")) as c:
        r = c.post("/api/v1/enrollment-tokens", json={"labels": labels})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def enroll(server: Server, token: str, device_id: str, **inv: Any) -> httpx.Response:
    body = {"enrollment_token": token, "device_id": device_id, "inventory": inventory(**inv)}
    return httpx.post(server.url + "/device/v1/enroll", json=body, timeout=10)


def credential(server: Server, token: str, device_id: str, **inv: Any) -> str:
    r = enroll(server, token, device_id, **inv)
    assert r.status_code == 201, r.text
    return EnrollResponse.model_validate(r.json()).credential


def assert_envelope(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "where", "hint"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    err: dict[str, Any] = body["error"]
    return err
