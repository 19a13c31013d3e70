"""A real control plane and real agents as subprocesses, for the agent suites (tests/agent).

`slmops server run` on its own data dir (stoppable and restartable on the same port), agents
started with `python -m slmops.cli.agent`, and the few operator calls the tests make: push a
bundle to the server's registry, apply a blueprint, read a rollout and wait for it to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from helpers import free_port

SERVER_CLI = [sys.executable, "-m", "slmops.cli.server"]
AGENT_CLI = [sys.executable, "-m", "slmops.cli.agent"]
TERMINAL = ("succeeded", "rolled-back", "aborted")


def cli_json(*args: str | Path) -> dict[str, Any]:
    res = subprocess.run(
        [*SERVER_CLI, *map(str, args), "--json"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr + res.stdout
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class ControlPlane:
    """`slmops server run` that can be stopped and started again on the same port and data."""

    def __init__(self, data: Path, env: Mapping[str, str] | None = None) -> None:
        self.data, self.port = data, free_port()
        data.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.admin = cli_json("token", "create", "--data", data, "--role", "admin")["token"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.data / "server.log").open("a") as log:
            cmd = [*SERVER_CLI, "run", "--data", str(self.data), "--port", str(self.port)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "server died"
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the server", up, 30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
            self.proc = None

    # operator calls ----------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
        )
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def devices(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.api("GET", "/api/v1/devices")["data"]
        return data

    def device(self, device_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.api("GET", f"/api/v1/devices/{device_id}")
        return doc

    def enrollment_token(self, labels: Mapping[str, str] | None = None) -> str:
        made = self.api("POST", "/api/v1/enrollment-tokens", {"labels": dict(labels or {})})
        return str(made["token"])

    def push(self, bundle: Path, repository: str, version: str) -> None:
        from slmops.bundle.registry import push

        push(bundle, f"oci://127.0.0.1:{self.port}/{repository}:{version}", token=self.admin)

    def blob(self, digest: str) -> Path:
        """Where the server's registry keeps a blob (server/registry/store.py)."""
        return self.data / "blobs" / "sha256" / digest.split(":", 1)[1]

    def apply(self, name: str, spec: dict[str, Any]) -> str | None:
        """PUT a blueprint; returns the id of the rollout it created, if any."""
        doc = {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": name}}
        applied = self.api("PUT", f"/api/v1/blueprints/{name}", doc | {"spec": spec})
        rollout = applied.get("rollout")
        return None if rollout is None else str(rollout)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.api("GET", f"/api/v1/rollouts/{rollout_id}")
        return doc

    def wait_rollout(self, rollout_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the rollout ends (succeeded, rolled-back or aborted); returns it."""

        def ended() -> dict[str, Any] | None:
            assert self.proc is None or self.proc.poll() is None, "server died"
            doc = self.rollout(rollout_id)
            return doc if doc["status"] in TERMINAL else None

        try:
            result: dict[str, Any] = wait_for(f"rollout {rollout_id} to end", ended, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {json.dumps(self.rollout(rollout_id))[:3000]}") from None
        return result


def start_agent(
    data: Path,
    server: str,
    api_port: int,
    *extra: str,
    device_id: str = "edge-1",
    labels: str = "room=lab",
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    cmd = [
        *AGENT_CLI,
        "--server",
        server,
        "--data",
        str(data),
        "--device-id",
        device_id,
        "--labels",
        labels,
        "--poll-seconds",
        "0.2",
        "--backoff-cap",
        "0.5",
        "--api-port",
        str(api_port),
        *extra,
    ]
    data.mkdir(parents=True, exist_ok=True)
    with (data / "agent.log").open("a") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def status(data: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((data / "agent-status.json").read_text())
        return doc
    except (OSError, ValueError):
        return {}


def stop_agent(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def immediate_rollout(**gates: Any) -> dict[str, Any]:
    """One wave of every device, no soak: the rollout moves at once."""
    base = {"min_soak_seconds": 0, "timeout_seconds": 120, "min_reported": 1.0}
    return {"waves": [{"percent": 100}], "gates": base | gates}


def inventory(**over: Any) -> dict[str, Any]:
    """The inventory a hand-made device enrolls and checks in with (a Pi 5-class box), with
    `over` replacing fields; a fresh dict each call, so a test may change it."""
    inv: dict[str, Any] = {
        "arch": "aarch64",
        "cores": 4,
        "ram_bytes": 8 * 2**30,
        "free_disk_bytes": 20 * 2**30,
        "runtimes": ["gguf"],
        "agent_version": "0.1.0",
        "model_ram_bytes": 2 * 2**30,
        "model_cores": 2,
        "profile": "rpi5",
        "labels": {},
    }
    return inv | over
