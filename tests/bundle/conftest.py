"""A real OCI registry for bundle transfer tests, and tiny OCI layouts to move through it.

The registry is Debian's `docker-registry` (distribution 2.8) run with a config written here:
its packaged config listens on every interface and turns on broken htpasswd auth, so we listen
on 127.0.0.1 only, on a free port, with filesystem storage in a temp folder. The helpers are
plain functions so that bench/bundle.py can load this file and reuse them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.bundle.media import (
    ANN_REF_NAME,
    ANN_TITLE,
    ANN_VERSION,
    ARTIFACT_BUNDLE,
    ARTIFACT_SIGNATURE,
    ARTIFACT_VARIANT,
    MT_EMPTY,
    MT_INDEX,
    MT_MANIFEST,
    MT_SIGNATURE,
    MT_VARIANT_CONFIG,
    MT_WEIGHTS_GGUF,
)

REGISTRY_BIN = Path("/usr/bin/docker-registry")
INSTALL_HINT = "install it with: apt-get install -y docker-registry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RegistryServer:
    address: str  # "127.0.0.1:PORT", the HOST:PORT of an oci:// reference
    storage: Path
    log: Path
    pid: int


def _start(workdir: Path, binary: Path) -> tuple[subprocess.Popen[bytes], RegistryServer]:
    port = free_port()
    storage, config, log = workdir / "storage", workdir / "registry.yml", workdir / "registry.log"
    storage.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}', secret: {secrets.token_hex(16)}}}\n"
    )
    # REGISTRY_* variables override the config file; never inherit any.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [str(binary), "serve", str(config)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    server = RegistryServer(f"127.0.0.1:{port}", storage, log, proc.pid)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://{server.address}/v2/", timeout=1.0).status_code == 200:
                return proc, server
        time.sleep(0.02)
    _stop(proc)
    raise RuntimeError(
        f"docker-registry did not answer on {server.address}:\n{log.read_text()[-2000:]}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def run_registry(workdir: Path, *, binary: Path = REGISTRY_BIN) -> Iterator[RegistryServer]:
    """Start docker-registry on 127.0.0.1 and a free port, wait for /v2/, stop it on exit."""
    if not binary.is_file():
        raise RuntimeError(f"{binary} not found: {INSTALL_HINT}")
    for attempt in range(3):  # the free port can be taken between probe and bind: retry
        try:
            proc, server = _start(workdir / f"run{attempt}", binary)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base address "127.0.0.1:PORT" of a real registry shared by the session's tests."""
    if not REGISTRY_BIN.is_file():
        pytest.fail(
            f"these tests need a real OCI registry: {REGISTRY_BIN} is missing; {INSTALL_HINT}",
            pytrace=False,
        )
    with run_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server.address


# --- tiny OCI layouts ------------------------------------------------------------------------


def add_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_random_blob(layout: Path, size: int, seed: int) -> dict[str, Any]:
    """A blob of `size` pseudo-random bytes, written and hashed in 1 MiB pieces."""
    rng, digest = random.Random(seed), hashlib.sha256()
    tmp = layout / "blobs" / "sha256" / f".tmp-{seed}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as fh:
        for start in range(0, size, 1 << 20):
            piece = rng.randbytes(min(1 << 20, size - start))
            digest.update(piece)
            fh.write(piece)
    tmp.rename(tmp.with_name(digest.hexdigest()))
    return {"digest": f"sha256:{digest.hexdigest()}", "size": size}


def _json_blob(layout: Path, obj: Any) -> dict[str, Any]:
    return add_blob(layout, json.dumps(obj, separators=(",", ":")).encode())


def build_layout(
    layout: Path,
    *,
    big_layers: Sequence[int] = (3 << 20,),
    version: str = "1.0.0",
    signers: Sequence[str] = ("test-key",),
    seed: int = 0,
) -> str:
    """A bundle-shaped OCI layout: 2 variants (small layers + `big_layers` in the first), a
    bundle index tagged `version`, and one signature manifest per signer. Returns its digest."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    variants = []
    for v in range(2):
        config = _json_blob(layout, {"variant": f"v{v}", "runtime": "gguf"})
        sizes = [4096 * (i + 1) for i in range(3)] + (list(big_layers) if v == 0 else [])
        layers = [
            {
                "mediaType": MT_WEIGHTS_GGUF,
                **add_random_blob(layout, n, seed * 100 + v * 10 + i),
                "annotations": {ANN_TITLE: f"file{i}.gguf"},
            }
            for i, n in enumerate(sizes)
        ]
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "artifactType": ARTIFACT_VARIANT,
            "config": {"mediaType": MT_VARIANT_CONFIG, **config},
            "layers": layers,
        }
        variants.append(
            {
                "mediaType": MT_MANIFEST,
                "artifactType": ARTIFACT_VARIANT,
                **_json_blob(layout, manifest),
            }
        )
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "artifactType": ARTIFACT_BUNDLE,
        "manifests": variants,
        "annotations": {ANN_VERSION: version},
    }
    root = {"mediaType": MT_INDEX, **_json_blob(layout, index)}
    entries = [{**root, "annotations": {ANN_REF_NAME: version}}]
    empty = add_blob(layout, b"{}")
    for signer in signers:
        payload = _json_blob(layout, {"digest": root["digest"], "key": signer, "sig": "00" * 64})
        sig = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "artifactType": ARTIFACT_SIGNATURE,
            "config": {"mediaType": MT_EMPTY, **empty},
            "layers": [{"mediaType": MT_SIGNATURE, **payload}],
            "subject": {"mediaType": MT_INDEX, "digest": root["digest"], "size": root["size"]},
        }
        entries.append(
            {
                "mediaType": MT_MANIFEST,
                "artifactType": ARTIFACT_SIGNATURE,
                **_json_blob(layout, sig),
            }
        )
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries})
    )
    return str(root["digest"])


# Fixtures rather than `from conftest import ...`: several conftest.py files share that name.
BIG_LAYER = 3 << 20  # one multi-MB layer: chunked with a 1 MiB chunk size, resumable mid-blob
LayoutBuilder = Callable[..., str]


@pytest.fixture(scope="session")
def bundle_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A signed bundle layout with one BIG_LAYER; (folder, bundle digest). Do not modify."""
    root = tmp_path_factory.mktemp("layout") / "bundle"
    return root, build_layout(root, big_layers=(BIG_LAYER,))


@pytest.fixture
def make_layout() -> LayoutBuilder:
    return build_layout


@pytest.fixture
def unused_port() -> int:
    return free_port()
