"""Bring your own files: `slmops import` and `slmops model dequantize`, as a user runs them.

The GGUF under test is built here from the tiny trained model with llama.cpp's own converter and
quantizer (real files, real runtimes); nothing downloads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli as slmops
from helpers import run_pass
from slmops.model.card import read_card

EVAL_OPTS = (
    "--profiles",
    "rpi5-8gb",
    "--repeats",
    "1",
    "--max-tokens",
    "8",
    "--windows",
    "4",
    "--window-tokens",
    "48",
)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Q4_K_M GGUF of the tiny model, alone in a folder with no slmops card (a 'download')."""
    root = tmp_path_factory.mktemp("gguf")
    run_pass("export-gguf", {"outtype": "f16"}, tiny_model, root / "f16")
    run_pass("quantize-gguf", {"type": "Q4_K_M"}, root / "f16", root / "q4")
    dl = root / "download"
    dl.mkdir()
    (root / "q4" / "model.gguf").rename(dl / "tiny-q4_k_m.gguf")
    return dl / "tiny-q4_k_m.gguf"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(".slmops-tmp")]


def test_import_gguf_file_and_folder(tiny_gguf: Path, tmp_path: Path) -> None:
    r = slmops("import", str(tiny_gguf), "--out", str(tmp_path / "a"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "tiny-q4_k_m" and out["format"] == "gguf"
    card = read_card(tmp_path / "a")
    assert card is not None and card.format == "gguf" and card.variant == "tiny-q4_k_m"
    o = card.origin or {}
    assert o["file"] == "tiny-q4_k_m.gguf" and o["sha256"] == _sha(tiny_gguf)
    assert card.origin_digest == "sha256:" + _sha(tiny_gguf)
    assert o["format"] == "gguf" and o["architecture"] == "llama"
    assert o["quantization"] == card.quantization == "Q4_K_M"
    assert o["context_length"] == 256 and o["parameters"] > 100_000
    # per-tensor types: every tensor named, the counts add up, norms stay F32, and the tiny
    # model's 64-wide rows push k-quants back to legacy types (as Gemma 3's 640 rows do)
    assert len(o["tensors"]) == o["tensor_count"] == sum(o["tensor_types"].values())
    assert o["tensors"]["output_norm.weight"] == "F32"
    assert not {"Q4_K", "Q6_K"} & set(o["tensor_types"]), o["tensor_types"]
    assert [(s.pass_name, s.kind) for s in card.chain] == [("import", "import")]
    assert card.origin_path is None  # a GGUF is not a reference: evaluate asks for one
    # hard-linked, not copied
    assert (tmp_path / "a" / "tiny-q4_k_m.gguf").stat().st_ino == tiny_gguf.stat().st_ino
    assert out["hard_linked"] is True

    r = slmops("import", str(tiny_gguf.parent), "--out", str(tmp_path / "b"), "--name", "dl")
    assert r.returncode == 0, r.stderr
    assert "Q4_K_M" in r.stdout and "tensor types" in r.stdout
    b = read_card(tmp_path / "b")
    assert b is not None and b.variant == "dl" and b.origin_digest == card.origin_digest
    assert b.digest == card.digest  # the same file, the same variant content

    again = slmops("import", str(tiny_gguf), "--out", str(tmp_path / "a"))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_imported_gguf_evaluates_bundles_and_signs(
    tiny_gguf: Path, tiny_model: Path, tmp_path: Path
) -> None:
    variant = tmp_path / "imported"
    assert slmops("import", str(tiny_gguf), "--out", str(variant)).returncode == 0
    no_ref = slmops("evaluate", str(variant), "--out", str(tmp_path / "r0"), *EVAL_OPTS)
    assert no_ref.returncode == 2 and "--reference" in no_ref.stderr

    r = slmops(
        "evaluate",
        str(variant),
        "--reference",
        str(tiny_model),
        "--out",
        str(tmp_path / "report"),
        *EVAL_OPTS,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["tiny-q4_k_m"]
    assert rep["variants"][0]["quantization"] == "Q4_K_M"
    assert rep["quality"]["tiny-q4_k_m"]["kld_mean"] < 0.5
    assert "note" not in rep["reference"]  # the original model, not a dequantized one

    bundle = tmp_path / "bundle"
    r = slmops(
        "bundle",
        str(variant),
        "--report",
        str(tmp_path / "report"),
        "--name",
        "tiny",
        "--version",
        "1.0.0",
        "--out",
        str(bundle),
        "--json",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    keys = json.loads(slmops("keys", "init", "--out", str(tmp_path / "keys"), "--json").stdout)
    assert slmops("sign", str(bundle), "--key", keys["private_key"]).returncode == 0
    ok = slmops("verify", str(bundle), "--trust", keys["public_key"], "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    info = json.loads(slmops("inspect", str(bundle), "--json").stdout)
    text = json.dumps(info)
    assert "tiny-q4_k_m" in text and "Q4_K_M" in text


def test_dequantize_matches_llama_cpp_and_joins_the_family(
    tiny_gguf: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from slmops.runtimes import open_runtime

    ref = tmp_path / "ref"
    r = slmops("model", "dequantize", str(tiny_gguf), "--out", str(ref), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    card = read_card(ref)
    assert card is not None and card.format == "hf"
    assert [(s.pass_name, s.kind) for s in card.chain] == [("dequantize", "import")]
    assert card.origin_digest == "sha256:" + _sha(tiny_gguf)
    note = (card.origin or {})["reference_note"]
    assert note == "reference: dequantized Q4_K_M, not the original weights"
    assert json.loads(r.stdout)["origin"]["dequantized_to"] == "float32"
    assert list(ref.glob("*.safetensors")) and (ref / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    text = (tiny_model / "heldout.txt").read_text()[:2000]
    got, want = (AutoTokenizer.from_pretrained(str(d)) for d in (ref, tiny_model))
    assert len(got) == len(want)  # no token invented past the GGUF's vocabulary
    assert got(text)["input_ids"] == want(text)["input_ids"]

    # transformers loads the folder; its logits follow llama.cpp's on the same GGUF and ids
    ids = list(range(3, 67))
    hf = open_runtime(ref, threads=2, n_ctx=128)
    cpp = open_runtime(tiny_gguf.parent, threads=2, n_ctx=128)
    try:
        a, b = np.asarray(hf.logits(ids)), np.asarray(cpp.logits(ids))
    finally:
        hf.close()
        cpp.close()
    assert a.shape == b.shape
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    assert top1 >= 0.9, top1

    # one family: variants optimized from the dequantized folder share the GGUF's origin, so
    # they evaluate together with the imported file, and the report says what the reference is
    (tmp_path / "recipe.yaml").write_text("variants:\n  f16:\n    - export-gguf: {outtype: f16}\n")
    variants = tmp_path / "variants"
    r = slmops("optimize", str(ref), "-r", str(tmp_path / "recipe.yaml"), "-o", str(variants))
    assert r.returncode == 0, r.stdout + r.stderr
    f16 = read_card(variants / "f16")
    assert f16 is not None and f16.origin_digest == card.origin_digest
    assert slmops("import", str(tiny_gguf), "--out", str(variants / "q4km")).returncode == 0
    r = slmops(
        "evaluate",
        str(variants),
        "--eval-text",
        str(tiny_model / "heldout.txt"),
        "--out",
        str(tmp_path / "report"),
        *EVAL_OPTS,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {v["name"] for v in rep["variants"]} == {"f16", "tiny-q4_k_m"}
    assert rep["reference"]["note"].startswith(note)
    # and says why a variant on the file's own grid can beat a higher-precision one
    assert "lands near the file's own grid" in rep["reference"]["note"]
    assert rep["reference"]["source_quantization"] == "Q4_K_M"
    assert rep["reference"]["path"] == str(ref.resolve())
    md = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert any(note in line for line in md[:4]), md[:4]
    assert note in (tmp_path / "report" / "report.html").read_text()


def _made_up_arch(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="frobnicator")
    w.add_context_length(64)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("command", ["import", "dequantize"])
def test_bad_gguf_files(tiny_gguf: Path, tmp_path: Path, command: str) -> None:
    renamed = tmp_path / "notes.gguf"
    renamed.write_text("these are my notes, not a model\n")
    truncated = tmp_path / "half.gguf"
    data = tiny_gguf.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    alien = _made_up_arch(tmp_path / "alien.gguf")
    cases = {
        renamed: "not a GGUF file",
        truncated: "truncated GGUF file",
        alien: "architecture 'frobnicator' is not one llama.cpp knows",
    }
    outs = tmp_path / "outs"
    outs.mkdir()
    for src, what in cases.items():
        out = outs / src.stem
        args = ("model", "dequantize") if command == "dequantize" else ("import",)
        r = slmops(*args, str(src), "--out", str(out))
        assert r.returncode == 2, (src, r.stdout, r.stderr)
        err = " ".join(r.stderr.split())
        assert src.name in err and what in err, err
        assert not out.exists()
        _no_leftovers(outs)
        j = slmops(*args, str(src), "--out", str(out), "--json")
        assert j.returncode == 2 and what in json.loads(j.stdout)["message"]


def test_dequantize_refuses_what_transformers_cannot_read(tmp_path: Path) -> None:
    import gguf

    from slmops.model.importer import transformers_gguf_architectures

    arch = "rwkv6"  # llama.cpp runs it; transformers' GGUF loader does not read it
    assert arch not in transformers_gguf_architectures()
    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = slmops("model", "dequantize", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert "rwkv.gguf" in err and "cannot read GGUF architecture 'rwkv6'" in err
    assert not (tmp_path / "out").exists()
    # ...but it imports as a variant, which is what the hint suggests
    r = slmops("import", str(path), "--out", str(tmp_path / "imp"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["origin"]["architecture"] == arch


def test_import_onnx_genai_and_hf_folders(tiny_model: Path, tmp_path: Path) -> None:
    run_pass("export-onnx", {"precision": "int4"}, tiny_model, tmp_path / "onnx")
    r = slmops("import", str(tmp_path / "onnx"), "--out", str(tmp_path / "o"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    card = read_card(tmp_path / "o")
    assert card is not None and card.format == "onnx-genai" and card.variant == "onnx"
    o = card.origin or {}
    assert o["architecture"] == "llama" and card.quantization == o["quantization"] == "INT4"
    assert card.origin_digest == card.digest  # a folder is its own original
    assert (tmp_path / "o" / "genai_config.json").stat().st_ino == (
        tmp_path / "onnx" / "genai_config.json"
    ).stat().st_ino

    r = slmops("import", str(tiny_model), "--out", str(tmp_path / "h"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    card = read_card(tmp_path / "h")
    assert card is not None and card.format == "hf"
    o = card.origin or {}
    assert o["architecture"] == "LlamaForCausalLM" and o["parameters"] > 100_000
    assert card.origin_path == str((tmp_path / "h").resolve())
    # an imported HF folder is not a deployable variant, and says so through evaluate
    r = slmops("evaluate", str(tmp_path / "h"), "--out", str(tmp_path / "rep"), *EVAL_OPTS)
    assert r.returncode == 2 and "no deployable variants" in r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    r = slmops("import", str(empty), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "nothing to import" in r.stderr
    assert not (tmp_path / "e").exists()
    os.rmdir(empty)
