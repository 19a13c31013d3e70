"""The control plane's OCI registry end to end: a real `slmops server run` on SQLite, pushed to
and pulled from with our own client (`slmops.bundle.registry`), plus raw HTTP for the edges.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from control_plane import inventory
from factories.registry import registry_helpers
from factories.server import _server
from slmops.bundle.media import MT_MANIFEST
from slmops.bundle.registry import pull, push

REPO = "models/demo"


helpers = registry_helpers()


@dataclass
class Server:
    url: str
    address: str
    data: Path
    admin: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def ref(self, tag: str) -> str:
        return f"oci://{self.address}/{REPO}:{tag}"

    def blob_files(self) -> set[str]:
        return {p.name for p in (self.data / "blobs" / "sha256").iterdir()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server suite's own `slmops server run` subprocess (SQLite), seen as a registry."""
    for base in _server(tmp_path_factory):
        yield Server(base.url, base.url.removeprefix("http://"), base.data, base.admin)


def token(server: Server, role: str) -> str:
    with server.client(server.admin) as c:
        r = c.post("/api/v1/tokens", json={"name": f"reg-{role}", "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def device_credential(server: Server) -> str:
    with server.client(token(server, "operator")) as c:
        r = c.post("/api/v1/enrollment-tokens", json={"labels": {}})
    assert r.status_code == 201, r.text
    body = {"enrollment_token": r.json()["token"], "device_id": "reg-dev", "inventory": INVENTORY}
    r = httpx.post(server.url + "/device/v1/enroll", json=body, timeout=10)
    assert r.status_code in (200, 201), r.text
    return str(r.json()["credential"])


INVENTORY = inventory()


def oci_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["errors"][0]["code"] == code


def referrers_index(server: Server, digest: str) -> str:
    """File name of the signature index push stored under the `sha256-<hex>` tag."""
    with server.client(server.admin) as c:
        r = c.head(f"/v2/{REPO}/manifests/{digest.replace(':', '-')}")
    assert r.status_code == 200, r.text
    return r.headers["docker-content-digest"].removeprefix("sha256:")


@pytest.fixture(scope="module")
def pushed(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    layout = tmp_path_factory.mktemp("layouts") / "v1"
    digest = helpers.build_layout(layout, big_layers=(3 << 20,), version="1.0.0")
    stats = push(
        layout,
        server.ref("1.0.0"),
        token=server.admin,
        chunk_size=1 << 20,
        monolithic_limit=1 << 20,
    )
    assert stats.digest == digest and stats.chunked_blobs == 1 and stats.blobs_skipped == 0
    return layout, digest


def test_push_pull_round_trip_repush_and_dedup(
    server: Server, pushed: tuple[Path, str], tmp_path: Path
) -> None:
    layout, digest = pushed
    local = {p.name for p in (layout / "blobs" / "sha256").iterdir()}
    # everything stored once, nothing else (no temp files); plus the referrers index push made
    assert server.blob_files() == local | {referrers_index(server, digest)}

    out = tmp_path / "pulled"
    stats = pull(server.ref("1.0.0"), out, token=token(server, "viewer"))
    assert stats.digest == digest and stats.signatures == 1
    for path in (out / "blobs" / "sha256").iterdir():
        assert path.read_bytes() == (layout / "blobs" / "sha256" / path.name).read_bytes()

    again = push(layout, server.ref("1.0.0"), token=server.admin)
    assert again.bytes_uploaded == 0 and again.manifests_put == 0

    second = tmp_path / "v2"  # same seed: same variant blobs, another index and signature
    digest2 = helpers.build_layout(second, big_layers=(3 << 20,), version="1.1.0")
    other = {p.name for p in (second / "blobs" / "sha256").iterdir()}
    stats2 = push(second, server.ref("1.1.0"), token=server.admin)
    assert stats2.blobs_skipped > 0 and stats2.bytes_uploaded < 1 << 20
    indexes = {referrers_index(server, d) for d in (digest, digest2)}
    assert server.blob_files() == local | other | indexes


def test_blob_range_reads(server: Server, pushed: tuple[Path, str]) -> None:
    layout, _ = pushed
    big = max((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data, url = big.read_bytes(), f"/v2/{REPO}/blobs/sha256:{big.name}"
    cred = device_credential(server)
    active = {"name": REPO, "version": "1.0.0", "variant": "v0", "digest": "sha256:" + "0" * 64}
    with server.client(cred) as c:  # claiming to run it is not enough (registry/scope.py)
        r = c.post("/device/v1/checkin", json={"inventory": INVENTORY, "active": active})
        assert r.status_code == 200, r.text
        assert c.get(url, headers={"Range": "bytes=100-199"}).status_code == 403
    with server.client(token(server, "viewer")) as c:
        r = c.get(url, headers={"Range": "bytes=100-199"})
        assert r.status_code == 206 and r.content == data[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(data)}"
        r = c.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
        assert r.status_code == 206 and r.content == data[-10:]
        r = c.get(url)
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == big.name
        head = c.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
        r = c.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
        oci_error(c.post(f"/v2/{REPO}/blobs/uploads/"), 403, "DENIED")
        oci_error(c.get(f"/v2/{REPO}/blobs/sha256:{'0' * 64}"), 404, "BLOB_UNKNOWN")


def test_auth_is_required(server: Server, pushed: tuple[Path, str], tmp_path: Path) -> None:
    r = httpx.get(server.url + f"/v2/{REPO}/tags/list")
    oci_error(r, 401, "UNAUTHORIZED")
    assert r.headers["www-authenticate"] == 'Bearer realm="slmops"'
    with server.client(token(server, "viewer")) as c:
        assert c.get(f"/v2/{REPO}/tags/list").json()["tags"][0] == "1.0.0"
        oci_error(c.post(f"/v2/{REPO}/blobs/uploads/"), 403, "DENIED")
    with pytest.raises(Exception, match="requires authentication"):
        pull(server.ref("1.0.0"), tmp_path / "anon")
    with server.client(server.admin) as c:
        oci_error(c.get("/v2/Bad_Name/tags/list"), 400, "NAME_INVALID")


def test_bad_uploads_and_manifests_are_refused(server: Server, pushed: tuple[Path, str]) -> None:
    with server.client(token(server, "operator")) as c:
        r = c.post(f"/v2/{REPO}/blobs/uploads/")
        assert r.status_code == 202 and r.headers["docker-upload-uuid"]
        location = r.headers["location"]
        r = c.patch(location, content=b"hello", headers={"Content-Range": "0-4"})
        assert r.status_code == 202 and r.headers["range"] == "0-4"
        oci_error(
            c.patch(location, content=b"x", headers={"Content-Range": "9-9"}),
            416,
            "BLOB_UPLOAD_INVALID",
        )
        oci_error(c.put(location), 400, "DIGEST_INVALID")
        oci_error(c.put(f"{location}?digest=sha256:{'1' * 64}"), 400, "DIGEST_INVALID")
        oci_error(c.put(location + "?digest=sha256:00"), 404, "BLOB_UPLOAD_UNKNOWN")  # gone

        blob = b"monolithic"
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        r = c.post(f"/v2/{REPO}/blobs/uploads/?digest={digest}", content=blob)
        assert r.status_code == 201 and r.headers["docker-content-digest"] == digest

        missing = {"mediaType": MT_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 3}
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": digest,
                "size": len(blob),
            },
            "layers": [missing],
        }
        headers = {"Content-Type": MT_MANIFEST}
        r = c.put(f"/v2/{REPO}/manifests/broken", content=json.dumps(manifest), headers=headers)
        oci_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
        oci_error(
            c.put(f"/v2/{REPO}/manifests/x", content=b"{", headers=headers), 400, "MANIFEST_INVALID"
        )
        oci_error(c.get(f"/v2/{REPO}/manifests/broken"), 404, "MANIFEST_UNKNOWN")


def test_models_versions_and_channels(server: Server, pushed: tuple[Path, str]) -> None:
    _, digest = pushed
    with server.client(token(server, "viewer")) as c:
        models = {m["name"]: m for m in c.get("/api/v1/models").json()["data"]}
        assert "1.0.0" in [v["tag"] for v in models[REPO]["versions"]]
        assert not any(v["tag"].startswith("sha256-") for v in models[REPO]["versions"])
        version = c.get(f"/api/v1/models/{REPO}/versions/1.0.0").json()
        assert version["digest"] == digest and version["signatures"] == 1
        assert len(version["variants"]) == 2
        assert version["total_bytes"] >= version["unique_bytes"] > 3 << 20
        assert (
            c.put(f"/api/v1/models/{REPO}/channels/stable", json={"version": "1.0.0"}).status_code
            == 403
        )
    with server.client(token(server, "operator")) as c:
        r = c.put(f"/api/v1/models/{REPO}/channels/stable", json={"version": "1.0.0"})
        assert r.status_code == 200 and r.json()["digest"] == digest
        assert c.get(f"/api/v1/models/{REPO}/channels/stable").json()["version"] == "1.0.0"
        r = c.put(f"/api/v1/models/{REPO}/channels/beta", json={"version": "9.9.9"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get("/api/v1/models").json()["data"][0]["channels"] == {"stable": "1.0.0"}
