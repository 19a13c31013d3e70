"""Keys, signatures, and trust: who may vouch for a bundle, and what a signature covers."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from factories.bundle_edits import _blob, _load, _put, edit_manifest, edit_top
from factories.bundles import build
from slmops.bundle.inspect import inspect_bundle
from slmops.bundle.signing import fingerprint_file, init_keys, sign_bundle
from slmops.bundle.verify import BundleVerificationError, verify_bundle
from slmops.core.errors import ConfigError, UserInputError


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("keys")
    return {n: init_keys(root, name=n) for n in ("alice", "mallory")}


def test_init_keys_modes_and_no_overwrite(tmp_path: Path) -> None:
    private, public = init_keys(tmp_path / "k")
    assert private.name == "slmops.key" and public.name == "slmops.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    fp = fingerprint_file(public)
    assert fp.startswith("sha256:") and len(fp) == 71
    before = private.read_bytes()
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        init_keys(tmp_path / "k")
    assert private.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["slmops.key", "slmops.pub"]


def test_sign_then_verify_with_a_trusted_key(tmp_path: Path, keys: dict) -> None:
    bundle = build(tmp_path)
    private, public = keys["alice"]
    info = sign_bundle(bundle, private)
    assert info.key == fingerprint_file(public)
    res = verify_bundle(bundle, [public])
    assert res.signed_by == [info.key] and res.digest == info.bundle_digest
    assert inspect_bundle(bundle)["signed_by"] == [info.key]


def test_sign_and_verify_a_tarball(tmp_path: Path, keys: dict) -> None:
    tar = build(tmp_path, tmp_path / "b.tar", format="tar")
    private, public = keys["alice"]
    info = sign_bundle(tar, private)
    assert verify_bundle(tar, [public]).signed_by == [info.key]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slmops-tmp")]


def test_untrusted_key_is_rejected_naming_both_fingerprints(tmp_path: Path, keys: dict) -> None:
    bundle = build(tmp_path)
    sign_bundle(bundle, keys["mallory"][0])
    with pytest.raises(BundleVerificationError) as exc:
        verify_bundle(bundle, [keys["alice"][1]])
    mallory, alice = fingerprint_file(keys["mallory"][1]), fingerprint_file(keys["alice"][1])
    assert f"signed by {mallory}, which is not among the trusted keys ({alice})" in str(exc.value)
    assert exc.value.exit_code == 1


def test_unsigned_bundle_is_rejected_when_a_signature_is_required(
    tmp_path: Path, keys: dict
) -> None:
    bundle = build(tmp_path)
    with pytest.raises(BundleVerificationError, match="the bundle is not signed"):
        verify_bundle(bundle, [keys["alice"][1]])
    with pytest.raises(UserInputError, match="no trusted public key"):
        verify_bundle(bundle, [])


def test_resigning_replaces_the_old_signature_and_keeps_others(tmp_path: Path, keys: dict) -> None:
    bundle = build(tmp_path)
    blobs_before = set((bundle / "blobs" / "sha256").iterdir())
    sign_bundle(bundle, keys["alice"][0], signed_at="2026-01-01T00:00:00Z")
    sign_bundle(bundle, keys["mallory"][0])
    sign_bundle(bundle, keys["alice"][0], signed_at="2026-06-01T00:00:00Z")
    top = json.loads((bundle / "index.json").read_text())
    assert len(top["manifests"]) == 3  # bundle index + one signature per key
    # alice's first signature (manifest + layer) is gone; 2 x (manifest, layer) + shared {}
    assert len(set((bundle / "blobs" / "sha256").iterdir()) - blobs_before) == 5
    both = [keys["alice"][1], keys["mallory"][1]]
    assert len(verify_bundle(bundle, both).signed_by) == 2
    signed = [s["signed_at"] for s in inspect_bundle(bundle)["signatures"]]
    assert "2026-06-01T00:00:00Z" in signed and "2026-01-01T00:00:00Z" not in signed


def test_forged_payload_fails_the_signature_check(tmp_path: Path, keys: dict) -> None:
    bundle = build(tmp_path)
    sign_bundle(bundle, keys["alice"][0])

    def forge(top: dict) -> None:
        entry = top["manifests"][1]
        manifest = _load(bundle, entry["digest"])
        layer = _load(bundle, manifest["layers"][0]["digest"])
        payload = json.loads(base64.b64decode(layer["payload"]))
        payload["version"] = "9.9.9"
        layer["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
        digest, size = _put(bundle, layer)
        manifest["layers"][0].update(digest=digest, size=size)
        entry["digest"], entry["size"] = _put(bundle, manifest)

    edit_top(bundle, forge)
    with pytest.raises(BundleVerificationError, match="does not verify over its payload"):
        verify_bundle(bundle, [keys["alice"][1]])


def test_signature_does_not_carry_over_to_changed_content(tmp_path: Path, keys: dict) -> None:
    bundle = build(tmp_path)
    sign_bundle(bundle, keys["alice"][0])
    # Swap a layer for a consistent but different blob, re-linking every digest above it: all
    # digests check out, but the bundle index is no longer the one that was signed.
    evil = _put(bundle, {"evil": True})
    edit_manifest(bundle, 0, lambda m: m["layers"][0].update(digest=evil[0], size=evil[1]))
    with pytest.raises(BundleVerificationError, match="its signatures cover sha256:"):
        verify_bundle(bundle, [keys["alice"][1]])


def test_tampered_bundle_is_never_signed(tmp_path: Path, keys: dict) -> None:
    bundle = build(tmp_path)
    top = json.loads((bundle / "index.json").read_text())
    index = _load(bundle, top["manifests"][0]["digest"])
    config = _load(bundle, index["manifests"][0]["digest"])["config"]
    _blob(bundle, config["digest"]).write_bytes(b"{}" + b" " * (config["size"] - 2))
    with pytest.raises(BundleVerificationError, match="does not match its descriptor"):
        sign_bundle(bundle, keys["alice"][0])
    assert len(json.loads((bundle / "index.json").read_text())["manifests"]) == 1


def test_bad_key_files(tmp_path: Path, keys: dict) -> None:
    bundle = build(tmp_path)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        sign_bundle(bundle, keys["alice"][1])  # the .pub by mistake
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        verify_bundle(bundle, [junk])
    with pytest.raises(UserInputError, match="cannot read"):
        verify_bundle(bundle, [tmp_path / "missing.pub"])
