"""Verification against tampered and crafted bundles: each names the first thing that fails.

A crafted manifest changes its own digest, so each helper re-links the chain above it (bundle
index, then the unsigned top-level index.json), exactly what an attacker would do; the structural
check must then catch it. Memory stays flat while a 200 MB weight is verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import tracemalloc
from pathlib import Path

import psutil
import pytest

from factories.bundle_edits import (
    Json,
    _blob,
    _load,
    _put,
    edit_index,
    edit_manifest,
    edit_top,
    fails,
    manifest,
)
from factories.bundles import VARIANTS, build
from slmops.bundle.build import build_bundle
from slmops.bundle.verify import BundleVerificationError, verify_blob_file, verify_bundle
from slmops.core.digest import tree_digest
from slmops.model.card import LineageCard


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return build(tmp_path)


def test_tampered_weight_byte_names_the_blob(bundle: Path) -> None:
    layer = manifest(bundle, 0)["layers"][0]  # q8 model.gguf
    with _blob(bundle, layer["digest"]).open("r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    fails(
        bundle,
        "variant q8 manifest layer 0 (model.gguf)",
        "does not match its digest",
        layer["digest"],
    )


def test_missing_blob(bundle: Path) -> None:
    layer = manifest(bundle, 2)["layers"][-1]  # int4 tokenizer.json (sorted last)
    _blob(bundle, layer["digest"]).unlink()
    fails(bundle, f"blob {layer['digest']} is missing", "tokenizer.json")


def test_manifest_referencing_an_unknown_digest(bundle: Path) -> None:
    unknown = "sha256:" + "ab" * 32
    edit_manifest(bundle, 1, lambda m: m["layers"][0].update(digest=unknown))
    fails(bundle, f"blob {unknown} is missing", "variant q4 manifest layer 0 (model.gguf)")


@pytest.mark.parametrize("where", ["layer", "top"])
def test_malformed_digest_with_path_traversal(bundle: Path, tmp_path: Path, where: str) -> None:
    evil = "sha256:../../../../outside"
    (tmp_path / "outside").write_text("{}")
    if where == "layer":
        edit_manifest(bundle, 0, lambda m: m["layers"][0].update(digest=evil))
    else:
        edit_top(bundle, lambda t: t["manifests"][0].update(digest=evil))
    fails(bundle, "malformed digest", "../../../../outside")


def test_oversize_declared_manifest_is_refused_before_reading(bundle: Path) -> None:
    edit_top(bundle, lambda t: t["manifests"][0].update(size=10_000_000_000))
    fails(bundle, "declared size 10000000000 bytes is over the 4194304-byte limit")


def test_oversize_declared_layer_and_config(bundle: Path) -> None:
    edit_manifest(bundle, 0, lambda m: m["layers"][0].update(size=1 << 40))
    fails(
        bundle, "variant q8 manifest layer 0 (model.gguf)", f"declared size {1 << 40} bytes is over"
    )
    other = build(bundle.parent, bundle.parent / "b2")
    edit_manifest(other, 1, lambda m: m["config"].update(size=1 << 30))
    fails(other, "variant q4 manifest config", "over the 16777216-byte limit")


def test_wrong_media_types(bundle: Path, tmp_path: Path) -> None:
    edit_manifest(bundle, 0, lambda m: m["layers"][0].update(mediaType="application/x-sh"))
    fails(bundle, "unknown layer media type 'application/x-sh'", "model.gguf")
    other = build(tmp_path, tmp_path / "b2")
    edit_index(other, lambda i: i["manifests"][1].update(mediaType="text/plain"))
    fails(other, "media type 'text/plain', expected application/vnd.oci.image.manifest.v1+json")
    other = build(tmp_path, tmp_path / "b3")
    edit_top(other, lambda t: t["manifests"][0].update(mediaType="application/zip"))
    fails(other, "index.json manifests[0]: unknown media type 'application/zip'")
    other = build(tmp_path, tmp_path / "b4")
    edit_manifest(other, 2, lambda m: m["config"].update(mediaType="application/x-evil"))
    fails(other, "variant int4 manifest", "config has unknown media type 'application/x-evil'")


def test_unknown_artifact_type(bundle: Path) -> None:
    edit_top(bundle, lambda t: t["manifests"][0].update(artifactType="application/x-miner"))
    fails(bundle, "unknown artifactType 'application/x-miner'")


def test_structurally_invalid_manifest_and_config(bundle: Path, tmp_path: Path) -> None:
    edit_manifest(bundle, 0, lambda m: m.update(schemaVersion=1))
    fails(bundle, "not a valid Manifest", "schemaVersion")
    other = build(tmp_path, tmp_path / "b2")

    def bad_config(m: Json) -> None:
        cfg = _load(other, m["config"]["digest"])
        cfg["disk_bytes"] = -5
        m["config"]["digest"], m["config"]["size"] = _put(other, cfg)

    edit_manifest(other, 3, bad_config)
    fails(other, "variant int8 manifest config", "not a valid VariantDescriptor", "disk_bytes")


def test_layout_file_and_symlinked_blob(bundle: Path, tmp_path: Path) -> None:
    (bundle / "oci-layout").write_text('{"imageLayoutVersion": "9.9"}')
    fails(bundle, "imageLayoutVersion '1.0.0'")
    other = build(tmp_path, tmp_path / "b2")
    layer = manifest(other, 0)["layers"][0]
    target = _blob(other, layer["digest"])
    copy = tmp_path / "elsewhere.gguf"
    copy.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(copy)
    fails(other, "is not a regular file")


def test_tar_bundle_verifies_in_place_and_catches_tampering(tmp_path: Path) -> None:
    tar = build(tmp_path, tmp_path / "b.tar", format="tar")
    res = verify_bundle(tar, [], require_signature=False)
    assert res.variants == list(VARIANTS)
    data = bytearray(tar.read_bytes())
    pos = data.find(b"GGUF" + bytes(range(256))[:32])
    data[pos + 50] ^= 1
    tar.write_bytes(bytes(data))
    fails(tar, "variant q8 manifest layer 0 (model.gguf)", "does not match its digest")


def test_verify_blob_file(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"hello")
    digest = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    verify_blob_file(f, digest, 5)
    with pytest.raises(BundleVerificationError, match="expected 4 bytes"):
        verify_blob_file(f, digest, 4)
    with pytest.raises(BundleVerificationError, match="does not match its digest"):
        verify_blob_file(f, "sha256:" + "0" * 64, 5)
    with pytest.raises(BundleVerificationError, match="missing"):
        verify_blob_file(tmp_path / "nope", digest, 5)


def test_verification_memory_stays_flat_on_a_200_mb_weight(tmp_path: Path) -> None:
    size = 200 * 2**20
    d = tmp_path / "variants" / "big"
    d.mkdir(parents=True)
    with (d / "model.gguf").open("wb") as fh:  # sparse: 200 MB without 200 MB of disk writes
        fh.write(b"GGUF")
        fh.truncate(size)
    LineageCard(
        format="gguf",
        digest=tree_digest(d),
        size_bytes=size,
        origin_digest="sha256:" + "1" * 64,
        variant="big",
        created_at="2026-01-01T00:00:00+00:00",
    ).write(d)
    out = tmp_path / "bundle"
    build_bundle(d.parent, None, name="acme/big", version="1.0.0", out=out)
    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample)
    t.start()
    tracemalloc.start()
    try:
        res = verify_bundle(out, [], require_signature=False)
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        done.set()
        t.join()
    assert res.bytes_verified > size
    assert traced_peak < 50 * 2**20, f"python allocations peaked at {traced_peak / 2**20:.1f} MB"
    assert peak[0] - base < 50 * 2**20, f"RSS grew by {(peak[0] - base) / 2**20:.1f} MB"


def test_verification_imports_only_what_the_edge_agent_may() -> None:
    """The agent imports verify: stdlib, pydantic, cryptography, slmops core/protocol/bundle."""
    import subprocess
    import sys

    code = (
        "import sys, slmops.bundle.verify\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'numpy', 'transformers', 'httpx', 'matplotlib', 'onnxruntime', 'llama_cpp')"
        " or m.startswith(('slmops.evaluate', 'slmops.model', 'slmops.server', 'slmops.optimize')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"verify pulls in: {out.stdout}"


# --- one chain of trust (bundle/trust.py), the `slmops verify` entry point ------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("annotation", "layer names key"),
        ("two-layers", "expected an empty config and one"),
        ("no-subject", "has no subject"),
    ],
)
def test_a_malformed_signature_next_to_a_good_one_is_an_error_naming_it(
    bundle: Path, tmp_path: Path, case: str, message: str
) -> None:
    """The same cases as tests/agent/test_agent_verify.py: both verifiers refuse alike."""
    from slmops.bundle.signing import fingerprint_file, init_keys, sign_bundle
    from slmops.bundle.trust import verify_signatures  # noqa: F401  (the shared module exists)

    private, public = init_keys(tmp_path / "keys", name="alice")
    _, other = init_keys(tmp_path / "keys", name="mallory")
    sign_bundle(bundle, private)
    top = json.loads((bundle / "index.json").read_text())
    sig_entry = next(d for d in top["manifests"] if d["mediaType"].endswith("manifest.v1+json"))
    sig = _load(bundle, sig_entry["digest"])
    ann = "io.slmops.signature.key"
    if case == "annotation":
        sig["annotations"][ann] = fingerprint_file(other)
    elif case == "two-layers":
        sig["layers"].append(sig["layers"][0])
    else:
        sig.pop("subject")
    digest, size = _put(bundle, sig)
    edit_top(bundle, lambda t: t["manifests"].append({**sig_entry, "digest": digest, "size": size}))
    with pytest.raises(BundleVerificationError, match=message) as exc:
        verify_bundle(bundle, [public])
    assert f"signature manifest {digest}" in str(exc.value), "the error names the manifest"
