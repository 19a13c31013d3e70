"""Agents pull bundle bytes from an external OCI registry named by the blueprint (`registry:`).

A real control plane, a real Debian docker-registry (the "external" one) and a real agent
process. The bundle is pushed to both, under a repository prefix on the external one
(`mirror/acme/bot`), then its layer blobs are deleted from the control plane's store: the
control plane can still resolve the variant (manifests and config are there), but only the
external registry can serve the weights. The model becomes active and serves. Then a version
the external registry lacks (404) and an unreachable registry: each is a failed action at the
downloading stage naming the external registry, and the device keeps serving its model.

Also: a bad `registry:` URL is refused by the CLI (exit 2) and the API (422) naming the key,
and the agent sends the device credential to no registry but the control plane's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import ControlPlane, immediate_rollout, start_agent, status, stop_agent, wait_for
from factories.registry import registry_helpers
from helpers import free_port
from slmops.agent.config import AgentConfig
from slmops.agent.oci_client import RegistryError
from slmops.agent.pull_source import ExternalRegistrySource, pull_source
from slmops.agent.transport import FakeTransport, reply
from slmops.bundle.layout import Manifest
from slmops.bundle.media import ARTIFACT_VARIANT
from slmops.bundle.registry import push
from slmops.core.errors import ConfigError
from slmops.protocol.device import DesiredModel

NAME = "acme/bot"
FAST = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2", "SLMOPS_POLL_SECONDS": "1"}
MAIN = [sys.executable, "-m", "slmops.cli.main"]
DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def external(tmp_path: Path) -> Iterator[str]:
    """HOST:PORT of a real OCI registry on 127.0.0.1."""
    helpers = registry_helpers()
    if not helpers.REGISTRY_BIN.is_file():
        pytest.fail(f"{helpers.REGISTRY_BIN} is missing: {helpers.INSTALL_HINT}", pytrace=False)
    with helpers.run_registry(tmp_path / "external") as server:
        yield server.address


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane for the module (the refused blueprints store nothing)."""
    cp = ControlPlane(tmp_path_factory.mktemp("server"), FAST)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def spec(version: str, registry: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "selector": {"room": "lab"},
        "model": {"name": NAME, "version": version},
        "generation": {"temperature": 0.0, "max_tokens": 8},
        "rollout": immediate_rollout(on_failure="rollback"),
    }
    return doc | ({"registry": registry} if registry else {})


def layer_digests(bundle: Path) -> set[str]:
    """Every layer (weights, tokenizer, cards...) of every variant manifest in the bundle."""
    found: set[str] = set()
    for path in (bundle / "blobs" / "sha256").iterdir():
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("artifactType") == ARTIFACT_VARIANT:
            found |= {d.digest for d in Manifest.model_validate(doc).layers}
    assert found, f"no variant manifest in {bundle}"
    return found


def action(cp: ControlPlane, device_id: str, rollout_id: str, version: str) -> dict[str, Any]:
    """The device's last reported action for ``version`` in the rollout."""
    actions = cp.device(device_id)["actions"]
    found = [a for a in actions if (a["rollout_id"], a["version"]) == (rollout_id, version)]
    assert found, cp.device(device_id)["actions"]
    doc: dict[str, Any] = found[0]
    return doc


def running(data: Path) -> str | None:
    """The version the agent's status file says is active (it is rewritten after each step,
    so it may lag the action report the server already has)."""
    active = status(data).get("active") or {}
    return active.get("version")


def chat(port: int) -> httpx.Response:
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)


def test_agent_pulls_from_the_external_registry_and_keeps_its_model_when_it_fails(
    plane: ControlPlane, external: str, bundles: Any, tmp_path: Path
) -> None:
    cp = plane
    plane.push(bundles.v1, NAME, "1.0.0")
    plane.push(bundles.v2, NAME, "1.1.0")  # on the control plane only
    push(bundles.v1, f"oci://{external}/mirror/{NAME}:1.0.0")
    layers = layer_digests(bundles.v1)
    for digest in layers:  # only the external registry can serve these bytes now
        cp.blob(digest).unlink()

    data, port = tmp_path / "edge", free_port()
    extra = ["--enroll-token", cp.enrollment_token(), "--trusted-key", str(bundles.pub)]
    agent = start_agent(data, cp.url, port, *extra, "--threads", "1", device_id="edge-1")
    try:
        wait_for("the agent to enroll", lambda: cp.devices(), 60)
        registry = f"http://{external}/mirror"
        rid = cp.apply("lab", spec("1.0.0", registry))
        assert rid is not None
        done = cp.wait_rollout(rid, 90)
        log = (data / "agent.log").read_text()
        assert done["status"] == "succeeded", (done, log)
        wait_for("the status file to say 1.0.0", lambda: running(data) == "1.0.0", 10)
        desired = json.loads((data / "desired.json").read_text())
        assert desired["model"]["registry"] == registry
        assert not any(cp.blob(d).exists() for d in layers), "the control plane got the bytes"
        answer = chat(port)
        assert answer.status_code == 200 and answer.json()["model"] == f"{NAME}:1.0.0", answer.text

        # a version the external registry does not hold: 404, failed at downloading
        rid = cp.apply("lab", spec("1.1.0", registry))
        assert rid is not None
        done = cp.wait_rollout(rid, 60)
        assert done["status"] == "rolled-back", done
        got = action(cp, "edge-1", rid, "1.1.0")
        assert (got["state"], got["stage"]) == ("failed", "downloading"), got
        assert f"external registry {external}" in got["detail"], got
        assert "HTTP 404" in got["detail"] and "push the bundle there too" in got["detail"], got

        # an unreachable registry: failed at downloading, the device keeps its model
        dead = f"127.0.0.1:{free_port()}"
        rid = cp.apply("lab", spec("1.1.0", f"http://{dead}"))
        assert rid is not None
        done = cp.wait_rollout(rid, 60)
        assert done["status"] == "rolled-back", done
        got = action(cp, "edge-1", rid, "1.1.0")
        assert (got["state"], got["stage"]) == ("failed", "downloading"), got
        assert f"external registry {dead} unreachable" in got["detail"], got

        assert agent.poll() is None, (data / "agent.log").read_text()
        assert running(data) == "1.0.0"
        assert chat(port).json()["model"] == f"{NAME}:1.0.0"
    finally:
        stop_agent(agent)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("https://user:secret@registry.example.com", "credentials"),
        ("ftp://registry.example.com", "not an http(s) URL"),
        ("https://registry.example.com/?x=1", "no query"),
        ("https://registry.example.com/Upper", "OCI repository component"),
    ],
)
def test_a_bad_registry_url_is_refused_naming_the_key(
    plane: ControlPlane, tmp_path: Path, url: str, needle: str
) -> None:
    doc = {"apiVersion": "slmops/v1", "kind": "Blueprint", "metadata": {"name": "bad"}}
    doc["spec"] = spec("1.0.0", url)
    r = httpx.put(
        f"{plane.url}/api/v1/blueprints/bad",
        json=doc,
        headers={"Authorization": f"Bearer {plane.admin}"},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert "registry" in (err["where"] or "") and needle in err["message"], err

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("SLMOPS_TOKEN", "SLMOPS_SERVER")}
    res = subprocess.run(
        [*MAIN, "apply", "-f", str(path), "--server", plane.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "SLMOPS_TOKEN": plane.admin},
        check=False,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "spec.registry" in res.stdout + res.stderr and needle in res.stdout + res.stderr
    if needle == "credentials":  # the refusal does not echo the password back
        assert "secret" not in res.stdout + res.stderr + r.text


def _want(registry: str | None) -> DesiredModel:
    return DesiredModel(
        name=NAME,
        version="1.0.0",
        variant="v",
        bundle_digest=DIGEST,
        manifest_digest=DIGEST,
        repository=NAME,
        registry=registry,
    )


def test_the_device_credential_goes_to_the_control_plane_only(tmp_path: Path) -> None:
    token_file = tmp_path / "reg.token"
    token_file.write_text("reg-token-123\n")
    cfg = AgentConfig(
        server="https://cp.example.com",
        data_dir=tmp_path,
        registry_tokens={"tokens.example.com": token_file},
    )
    own = pull_source(_want(None), cfg, cfg.server, "device-secret")
    assert own.headers["Authorization"] == "Bearer device-secret"
    assert own.repo == "https://cp.example.com/v2/acme/bot"

    anonymous = pull_source(_want("https://registry.example.com/mirror"), cfg, cfg.server, "x")
    assert "Authorization" not in anonymous.headers
    assert anonymous.repo == "https://registry.example.com/v2/mirror/acme/bot"

    tokened = pull_source(_want("https://tokens.example.com:8443"), cfg, cfg.server, "x")
    assert tokened.headers["Authorization"] == "Bearer reg-token-123"
    assert tokened.repo == "https://tokens.example.com:8443/v2/acme/bot"

    https_loopback = pull_source(_want("https://127.0.0.1:5000"), cfg, cfg.server, "x")
    assert https_loopback.repo.startswith("https://127.0.0.1:5000/"), "https as written"

    with pytest.raises(ConfigError, match="plain http"):
        pull_source(_want("http://registry.example.com"), cfg, cfg.server, "x")
    allowed = cfg.model_copy(update={"allow_http": True})
    assert pull_source(_want("http://registry.example.com"), allowed, cfg.server, "x").repo == (
        "http://registry.example.com/v2/acme/bot"
    )

    token_file.unlink()
    with pytest.raises(ConfigError, match=r"token file for registry tokens\.example\.com"):
        pull_source(_want("https://tokens.example.com"), cfg, cfg.server, "x")


def test_a_401_from_the_external_registry_says_how_to_give_a_token(tmp_path: Path) -> None:
    source = ExternalRegistrySource("https://registry.example.com", NAME, token=None)
    source.transport = FakeTransport(
        lambda req: reply(
            401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        )
    )
    with pytest.raises(RegistryError) as exc:
        source.get_manifest(DIGEST)
    text = exc.value.render()
    assert "external registry registry.example.com" in text and "HTTP 401" in text
    assert "registry_tokens" in text
