"""Adapter artifacts: `slmops bundle-adapter` over a real base bundle and a real LoRA adapter,
signed, verified, inspected and pushed to the control plane's registry; and the refusals
(another base, wrong shape or rank, corrupt file, unsigned or tampered adapter)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter_fixtures import build_base, make_adapter, write_gguf_header
from control_plane import ControlPlane
from helpers import run_cli
from slmops.bundle.registry import RegistryError, push
from slmops.bundle.signing import init_keys


@pytest.fixture(scope="module")
def made(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter-bundle")
    priv, pub = init_keys(root / "keys", "fleet")
    base = build_base(tiny_model, root, priv)
    adapter = make_adapter(tiny_model, root / "adapter", "s1", rank=8)
    return {"root": root, "priv": priv, "pub": pub, "base": base, "adapter": adapter}


def _bundle(made: dict[str, Path], adapter: Path, out: Path, *extra: str) -> dict:
    res = run_cli(
        "bundle-adapter", str(adapter), "--base", str(made["base"]), "--name", "store-1-menu",
        "--version", "1.0.0", "--out", str(out), "--json", *extra,
    )  # fmt: skip
    doc = json.loads(res.stdout)
    doc["_rc"] = res.returncode
    return doc


def test_bundle_sign_verify_inspect(made: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "store-1-menu"
    doc = _bundle(made, made["adapter"], out)
    assert doc["_rc"] == 0, doc
    assert doc["variants"] == ["gguf-q8_0"] and doc["base"].startswith("acme/bot:1.0.0@sha256:")
    size = (made["adapter"] / "adapter.gguf").stat().st_size
    assert doc["adapter_bytes"] == size

    unsigned = run_cli("verify", str(out), "--trust", str(made["pub"]), "--json")
    assert unsigned.returncode == 1 and "not signed" in unsigned.stdout + unsigned.stderr

    assert run_cli("sign", str(out), "--key", str(made["priv"])).returncode == 0
    ok = run_cli("verify", str(out), "--trust", str(made["pub"]), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    verified = json.loads(ok.stdout)
    assert verified["kind"] == "adapter" and verified["variants"] == ["gguf-q8_0"]
    assert verified["digest"] == doc["digest"] and verified["signed_by"]

    info = json.loads(run_cli("inspect", str(out), "--json").stdout)
    base_index = json.loads((made["base"] / "index.json").read_text())["manifests"][0]
    assert info["kind"] == "adapter" and info["subject"] == base_index["digest"]
    assert info["base"]["bundle_digest"] == base_index["digest"]
    assert info["rank"] == 8 and info["fits_variants"][0]["gguf_bytes"] > size
    assert {f["title"] for f in info["files"]} >= {"adapter.gguf", "slmops-card.json"}

    # tampering with the LoRA bytes after signing: verification names the layer (exit 1)
    gguf = next(f for f in info["files"] if f["title"] == "adapter.gguf")
    blob = next(p for p in (out / "blobs" / "sha256").iterdir() if p.stat().st_size == gguf["size"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = run_cli("verify", str(out), "--trust", str(made["pub"]))
    assert bad.returncode == 1 and "adapter.gguf" in bad.stdout + bad.stderr


def test_refusals_exit_2(made: dict[str, Path], tmp_path: Path) -> None:
    def variant(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(made["adapter"], dst)
        return dst

    # trained on another model: the base's lineage does not include it
    other = variant("other-base")
    card = json.loads((other / "slmops-card.json").read_text())
    card["chain"][-1]["input_digest"] = "sha256:" + "ab" * 32
    (other / "slmops-card.json").write_text(json.dumps(card))
    doc = _bundle(made, other, tmp_path / "o1")
    assert doc["_rc"] == 2 and "does not fit acme/bot:1.0.0" in doc["message"]
    assert "lineage" in doc["message"] and not (tmp_path / "o1").exists()

    # a LoRA whose tensors have another shape than the base's
    wide = variant("wide")
    write_gguf_header(
        wide / "adapter.gguf",
        {"blk.0.attn_q.weight.lora_a": (96, 8), "blk.0.attn_q.weight.lora_b": (8, 96)},
    )
    doc = _bundle(made, wide, tmp_path / "o2")
    assert doc["_rc"] == 2 and "shapes differ" in doc["message"]
    assert "blk.0.attn_q.weight is [64, 64]" in doc["message"]

    # a pair whose ranks disagree, and a truncated file
    rank = variant("rank")
    write_gguf_header(
        rank / "adapter.gguf",
        {"blk.0.attn_q.weight.lora_a": (64, 8), "blk.0.attn_q.weight.lora_b": (4, 64)},
    )
    doc = _bundle(made, rank, tmp_path / "o3")
    assert doc["_rc"] == 2 and "rank does not match" in doc["message"]
    cut = variant("cut")
    raw = (cut / "adapter.gguf").read_bytes()
    (cut / "adapter.gguf").write_bytes(raw[:200])
    doc = _bundle(made, cut, tmp_path / "o4")
    assert doc["_rc"] == 2 and "corrupt adapter file" in doc["message"]

    # a variant the base does not have, and a folder that is no adapter
    doc = _bundle(made, made["adapter"], tmp_path / "o5", "--variant", "gguf-q2")
    assert doc["_rc"] == 2 and "no variant gguf-q2" in doc["message"]
    doc = _bundle(made, made["base"], tmp_path / "o6")
    assert doc["_rc"] == 2 and "not an adapter folder" in doc["message"]


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path / "server")
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def test_push_needs_the_base_first(
    made: dict[str, Path], tmp_path: Path, control_plane: ControlPlane
) -> None:
    out = tmp_path / "adapter"
    assert _bundle(made, made["adapter"], out)["_rc"] == 0
    assert run_cli("sign", str(out), "--key", str(made["priv"])).returncode == 0
    ref = f"oci://127.0.0.1:{control_plane.port}/store-1-menu:1.0.0"
    with pytest.raises(RegistryError, match="push the base first"):
        push(out, ref, token=control_plane.admin)
    control_plane.push(made["base"], "acme/bot", "1.0.0")
    # a blueprint already names the adapter: its signature's arrival recomputes devices
    control_plane.apply(
        "shops",
        {
            "model": {"name": "acme/bot", "version": "1.0.0"},
            "adapters": [
                {"selector": {"site": "s1"}, "adapter": "store-1-menu", "version": "1.0.0"}
            ],
        },
    )
    stats = push(out, ref, token=control_plane.admin)
    assert stats.digest == json.loads((out / "index.json").read_text())["manifests"][0]["digest"]
    # under another name than it was signed with: refused before any upload
    res = run_cli("push", str(out), f"oci://127.0.0.1:{control_plane.port}/other:1.0.0")
    assert res.returncode == 2 and "signed as store-1-menu:1.0.0" in res.stdout + res.stderr
