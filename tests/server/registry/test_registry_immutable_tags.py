"""Version tags are immutable on the control plane's registry: a PUT that would point
``repo:version`` at another digest is refused with 409 in the OCI error shape, while the same
digest again stays a success (pushes retry) and the ``sha256-<hex>`` signature tags still move.
A real `slmops server run` (SQLite), raw HTTP for the edges and the real `slmops push` CLI.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from factories.bundles import make_inputs
from factories.server import Server, _server
from slmops.bundle.build import build_bundle
from slmops.bundle.media import MT_MANIFEST

MAIN = [sys.executable, "-m", "slmops.cli.main"]
REPO = "immutable/demo"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _server(tmp_path_factory)


def _blob(c: httpx.Client, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = c.post(f"/v2/{REPO}/blobs/uploads/?digest={digest}", content=data)
    assert r.status_code == 201, r.text
    return digest


def _manifest(c: httpx.Client, layer: bytes) -> bytes:
    """A minimal OCI manifest (empty config, one layer) whose blobs are pushed."""
    config = b"{}"
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": _blob(c, config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/octet-stream",
                "digest": _blob(c, layer),
                "size": len(layer),
            }
        ],
    }
    return json.dumps(doc).encode()


def _put(c: httpx.Client, reference: str, data: bytes) -> httpx.Response:
    return c.put(
        f"/v2/{REPO}/manifests/{reference}", content=data, headers={"Content-Type": MT_MANIFEST}
    )


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_version_tag_cannot_be_repointed(server: Server) -> None:
    with server.client(server.admin) as c:
        first, second = _manifest(c, b"one"), _manifest(c, b"two")
        assert _put(c, "1.0.0", first).status_code == 201
        r = _put(c, "1.0.0", first)  # the same digest again: a no-op success
        assert r.status_code == 201 and r.headers["docker-content-digest"] == _digest(first)

        r = _put(c, "1.0.0", second)
        assert r.status_code == 409, r.text
        (error,) = r.json()["errors"]
        assert error["code"] == "DENIED"
        assert "immutable" in error["message"] and _digest(first) in error["message"]
        assert "new version" in error["message"]
        # the tag still names the first digest, and the refused one was not stored
        got = c.get(f"/v2/{REPO}/manifests/1.0.0", headers={"Accept": MT_MANIFEST})
        assert got.status_code == 200 and got.content == first
        assert c.head(f"/v2/{REPO}/manifests/{_digest(second)}").status_code == 404

        # by digest it may be stored (no tag moves), and under a new version tag
        assert _put(c, _digest(second), second).status_code == 201
        assert _put(c, "1.0.1", second).status_code == 201
        assert _put(c, "1.0.0", second).status_code == 409  # still, now that it is stored


def test_signature_tags_still_move(server: Server) -> None:
    tag = "sha256-" + "a" * 64
    with server.client(server.admin) as c:
        first, second = _manifest(c, b"sig one"), _manifest(c, b"sig two")
        assert _put(c, tag, first).status_code == 201
        assert _put(c, tag, second).status_code == 201  # a push merges signatures here
        got = c.get(f"/v2/{REPO}/manifests/{tag}", headers={"Accept": MT_MANIFEST})
        assert got.content == second


def _push(bundle: Path, ref: str, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAIN, "push", str(bundle), ref, "--token", token],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_slmops_push_repeats_and_reports_a_conflict(server: Server, tmp_path: Path) -> None:
    """`slmops push` of one bundle twice succeeds both times; another build under the same
    version exits 1 and says why and what to do."""
    ref = f"oci://{server.url.removeprefix('http://')}/assistant:2.0.0"
    builds = []
    for i, names in enumerate((None, ["q4"])):
        variants, report = make_inputs(tmp_path / f"in{i}", names)
        built = build_bundle(
            variants, report, name="assistant", version="2.0.0", out=tmp_path / f"b{i}"
        )
        builds.append(built)
    assert builds[0].digest != builds[1].digest

    for _ in range(2):
        res = _push(builds[0].path, ref, server.admin)
        assert res.returncode == 0, res.stderr + res.stdout
    res = _push(builds[1].path, ref, server.admin)
    assert res.returncode == 1, res.stderr + res.stdout
    said = res.stderr + res.stdout
    assert "409" in said and "immutable" in said and "new version" in said, said
    with server.client(server.admin) as c:
        r = c.head("/v2/assistant/manifests/2.0.0")
    assert r.headers["docker-content-digest"] == builds[0].digest
