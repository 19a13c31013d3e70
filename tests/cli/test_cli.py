"""The CLI as a user meets it: exit codes, messages, --json on every command."""

import json
from pathlib import Path

import pytest

from helpers import run_cli as slmops


def test_version() -> None:
    r = slmops("--version")
    assert r.returncode == 0 and r.stdout.startswith("slmops ")


def test_passes_json_lists_every_pass_with_options() -> None:
    r = slmops("passes", "--json")
    assert r.returncode == 0, r.stderr
    passes = {p["name"]: p for p in json.loads(r.stdout)}
    assert {
        "export-gguf",
        "quantize-gguf",
        "export-onnx",
        "prune-magnitude",
        "prune-nm",
        "prune-wanda",
    } <= set(passes)
    opts = {o["name"]: o for o in passes["quantize-gguf"]["options"]}
    assert opts["type"]["default"] == "Q4_K_M"
    human = slmops("passes")
    assert "export-onnx" in human.stdout and "block_size" in human.stdout


def test_optimize_bad_model_path_exits_2(tmp_path: Path) -> None:
    r = slmops("optimize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "no such model directory" in r.stderr and "hint" in r.stderr
    rj = slmops("optimize", str(tmp_path), "--out", str(tmp_path / "o"), "--json")
    assert rj.returncode == 2
    err = json.loads(rj.stdout)
    assert err["ok"] is False and err["error"] == "ModelFormatError" and err["exit_code"] == 2


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        ("variants:\n  a:\n    - prune-magnitude: {sparsity: 1.0}\n", "sparsity"),
        ("variants:\n  a:\n    - export-gguf: {bogus: 1}\n", "unknown key 'bogus'"),
        ("variants:\n  a:\n    - not-a-pass\n", "unknown pass 'not-a-pass'"),
        ("variants: [oops\n", "not valid YAML"),
    ],
)
def test_optimize_bad_recipe_exits_2(
    tiny_model: Path, tmp_path: Path, recipe: str, needle: str
) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(recipe)
    out = tmp_path / "o"
    r = slmops("optimize", str(tiny_model), "--recipe", str(f), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and str(f) in r.stderr
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_missing_option_is_usage_error(tmp_path: Path) -> None:
    r = slmops("optimize", str(tmp_path))
    assert r.returncode == 2 and "--out" in r.stderr


def test_model_info_json(tiny_model: Path) -> None:
    r = slmops("model", "info", str(tiny_model), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "hf" and info["card"] is None and info["weights_bytes"] > 0
