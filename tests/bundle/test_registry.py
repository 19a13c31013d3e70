"""Push and pull over the OCI Distribution API against a real docker-registry (no mocks)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from slmops.bundle.media import ANN_REF_NAME, ARTIFACT_SIGNATURE, MT_INDEX
from slmops.bundle.oci_ref import Desc, OciRefError, check_digest, parse_oci_ref
from slmops.bundle.registry import (
    RegistryError,
    RegistryIntegrityError,
    pull,
    push,
)
from slmops.core.errors import UserInputError

BIG = 3 << 20  # the size of bundle_layout's big layer (conftest.BIG_LAYER)
Layout = tuple[Path, str]
LayoutBuilder = Callable[..., str]


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def index_entries(root: Path) -> list[dict[str, object]]:
    return list(json.loads((root / "index.json").read_text())["manifests"])


def test_round_trip_chunked_then_repush_moves_nothing(
    bundle_layout: Layout, oci_registry: str, tmp_path: Path
) -> None:
    src, digest = bundle_layout
    ref = f"oci://{oci_registry}/rt/bundle:1.0.0"
    first = push(src, ref, chunk_size=1 << 20, monolithic_limit=1 << 20)
    assert first.digest == digest
    assert first.chunked_blobs == 1 and first.blobs_skipped == 0 and first.bytes_uploaded > BIG
    assert first.blobs_uploaded == 11  # 2 configs, 7 layers, the signature's config and payload
    assert first.manifests_put == 5  # 2 variants, bundle index, signature, referrers index

    again = push(src, ref)
    assert (again.bytes_uploaded, again.blobs_uploaded, again.manifests_put) == (0, 0, 0)
    assert again.blobs_skipped == first.blobs_uploaded and again.digest == digest

    stats = pull(ref, tmp_path / "out")
    assert stats.digest == digest and stats.signatures == 1 and stats.bytes_resumed == 0
    assert stats.bytes_downloaded == first.bytes_uploaded
    out = tmp_path / "out"
    assert files(out / "blobs") == files(src / "blobs")  # every blob, byte for byte
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    root, sig = index_entries(out)
    assert root == {**index_entries(src)[0], "annotations": {ANN_REF_NAME: "1.0.0"}}
    assert (
        sig["artifactType"] == ARTIFACT_SIGNATURE
        and sig["digest"] == index_entries(src)[1]["digest"]
    )
    assert not (tmp_path / "out.partial").exists()

    # Same bundle already there: nothing to do. By digest works too.
    assert pull(f"oci://{oci_registry}/rt/bundle@{digest}", out).blobs_downloaded == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(UserInputError, match="not empty"):
        pull(ref, tmp_path / "other")


def test_signatures_accumulate_under_the_referrers_tag(
    make_layout: LayoutBuilder, oci_registry: str, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    digest = make_layout(one, big_layers=(), signers=["alice"])
    assert make_layout(two, big_layers=(), signers=["bob"]) == digest  # same bundle, new signer
    ref = f"oci://{oci_registry}/sigs/bundle:2.0"
    push(one, ref)
    assert push(two, ref).manifests_put == 2  # bob's signature + the merged referrers index
    tag_url = f"http://{oci_registry}/v2/sigs/bundle/manifests/{digest.replace(':', '-')}"
    index = httpx.get(tag_url, headers={"Accept": MT_INDEX}).json()
    assert index["mediaType"] == MT_INDEX and len(index["manifests"]) == 2
    assert pull(ref, tmp_path / "out").signatures == 2


def test_unsigned_bundle_pulls_without_signatures(
    make_layout: LayoutBuilder, oci_registry: str, tmp_path: Path
) -> None:
    digest = make_layout(tmp_path / "src", big_layers=(), signers=[])
    ref = f"oci://{oci_registry}/unsigned/b:1"
    push(tmp_path / "src", ref)
    stats = pull(ref, tmp_path / "out")
    assert stats.digest == digest and stats.signatures == 0
    assert len(index_entries(tmp_path / "out")) == 1


def test_interrupted_pull_resumes_with_range(
    bundle_layout: Layout, oci_registry: str, tmp_path: Path
) -> None:
    src, digest = bundle_layout
    ref = f"oci://{oci_registry}/resume/bundle:1.0.0"
    push(src, ref)
    out = tmp_path / "out"
    with pytest.raises(RegistryError, match="stopped"):
        pull(ref, out, _stop_after_bytes=BIG // 2)
    parts = list((tmp_path / "out.partial").rglob("*.part"))
    assert not out.exists() and len(parts) == 1 and parts[0].stat().st_size > 0
    kept = parts[0].stat().st_size

    stats = pull(ref, out)
    assert stats.digest == digest and stats.bytes_resumed == kept > 0
    assert files(out / "blobs") == files(src / "blobs")
    assert not (tmp_path / "out.partial").exists()


def test_damaged_partial_is_detected_then_recovered(
    bundle_layout: Layout, oci_registry: str, tmp_path: Path
) -> None:
    src, _ = bundle_layout
    ref = f"oci://{oci_registry}/damaged/bundle:1.0.0"
    push(src, ref)
    out = tmp_path / "out"
    with pytest.raises(RegistryError):
        pull(ref, out, _stop_after_bytes=BIG // 2)
    part = next((tmp_path / "out.partial").rglob("*.part"))
    part.write_bytes(b"\0" * part.stat().st_size)  # same size, wrong bytes
    with pytest.raises(RegistryIntegrityError, match="does not match"):
        pull(ref, out)
    assert not part.exists() and not out.exists()  # the bad partial is gone; the next run restarts
    assert pull(ref, out).bytes_resumed == 0
    assert files(out / "blobs") == files(src / "blobs")


def test_wrong_digest_and_missing_tag_fail_cleanly(
    bundle_layout: Layout, oci_registry: str, tmp_path: Path
) -> None:
    src, _ = bundle_layout
    push(src, f"oci://{oci_registry}/wrong/bundle:1.0.0")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(RegistryError, match="MANIFEST_UNKNOWN") as err:
        pull(f"oci://{oci_registry}/wrong/bundle@{wrong}", tmp_path / "a")
    assert err.value.exit_code == 1 and not (tmp_path / "a").exists()
    with pytest.raises(RegistryError, match="not found"):
        pull(f"oci://{oci_registry}/wrong/bundle:9.9.9", tmp_path / "b")
    with pytest.raises(UserInputError, match="layout's bundle"):
        push(src, f"oci://{oci_registry}/wrong/bundle@{wrong}")


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:5000/repo:tag",  # no scheme
        "http://127.0.0.1:5000/repo:tag",
        "oci://127.0.0.1:5000",  # no repository
        "oci://127.0.0.1:5000/",
        "oci://127.0.0.1:99999/repo:tag",  # port out of range
        "oci://127.0.0.1:port/repo",
        "oci://bad_host!/repo",
        "oci://[::1/repo",
        "oci://127.0.0.1:5000/Repo:tag",  # uppercase repository
        "oci://127.0.0.1:5000/repo:-tag",
        "oci://127.0.0.1:5000/repo@sha256:abc",  # short digest
        "oci://127.0.0.1:5000/repo@sha512:" + "a" * 128,
        "oci://127.0.0.1:5000/repo@sha256:" + "A" * 64,
        "oci://127.0.0.1:5000/../etc:tag",
    ],
)
def test_malformed_refs_are_exit_2(text: str) -> None:
    with pytest.raises(OciRefError) as err:
        parse_oci_ref(text)
    assert err.value.exit_code == 2


def test_ref_parts_and_scheme() -> None:
    digest = "sha256:" + "ab" * 32
    ref = parse_oci_ref(f"oci://127.0.0.1:5000/models/demo:1.0.0@{digest}")
    assert (ref.host, ref.port, ref.repository, ref.tag, ref.digest) == (
        "127.0.0.1", 5000, "models/demo", "1.0.0", digest,
    )  # fmt: skip
    assert ref.reference == digest and ref.base_url() == "http://127.0.0.1:5000"
    v6 = parse_oci_ref("oci://[::1]:5000/r:t")
    assert v6.netloc == "[::1]:5000" and v6.base_url().startswith("http://")
    remote = parse_oci_ref("oci://registry.example.com/team/model:latest")
    assert remote.port is None and remote.base_url() == "https://registry.example.com"
    assert remote.base_url(allow_http=True) == "http://registry.example.com"
    assert str(parse_oci_ref(str(ref))) == str(ref)
    with pytest.raises(OciRefError, match="neither"):
        _ = parse_oci_ref("oci://127.0.0.1:5000/r").reference


def test_untrusted_descriptors_are_refused() -> None:
    good = {"mediaType": MT_INDEX, "digest": "sha256:" + "0" * 64, "size": 2}
    assert Desc.parse(good, "x").size == 2
    for bad in (
        {**good, "digest": "sha256:../../../etc/passwd"},
        {**good, "size": -1},
        {**good, "size": True},
        {**good, "size": 1 << 60},
        {"digest": good["digest"], "size": 2},
    ):
        with pytest.raises((RegistryIntegrityError, OciRefError)):
            Desc.parse(bad, "x")
    with pytest.raises(OciRefError):
        check_digest("sha256:" + "0" * 63)


def test_unreachable_registry_names_host_and_port(
    bundle_layout: Layout, unused_port: int, tmp_path: Path
) -> None:
    port = unused_port  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}") as err:
        pull(f"oci://127.0.0.1:{port}/x/y:1", tmp_path / "out")
    assert err.value.exit_code == 1 and "unreachable" in str(err.value)
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}"):
        push(bundle_layout[0], f"oci://127.0.0.1:{port}/x/y:1")
    assert time.monotonic() - start < 5
