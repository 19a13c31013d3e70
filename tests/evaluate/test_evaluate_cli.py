"""End to end: optimize a tiny model, evaluate it on profiles, gate the report, as a user would."""

import json
from pathlib import Path

import pytest

from helpers import run_cli as slmops

RECIPE = """
variants:
  f16:
    - export-gguf: {outtype: f16}
  q8:
    - export-gguf: {outtype: f16}
    - quantize-gguf: {type: Q8_0}
  pruned90:
    - prune-magnitude: {sparsity: 0.9}
    - export-gguf: {outtype: f16}
  onnx-int4:
    - export-onnx: {precision: int4}
"""

TINY_PROFILE = """
name: tiny-mcu
description: far too small for any model runtime
arch: arm64
cores: 1
ram_mb: 20
storage_mb: 64
runtimes: [gguf]
context_length: 128
prompt_tokens: 16
relative_speed: 0.05
budgets: {max_ttft_ms: 5000, min_decode_tps: 1, max_kld: 1.0}
cost: {hardware_usd: 5, lifetime_years: 5, power_watts: 1}
"""


@pytest.fixture(scope="module")
def evaluated(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "tiny.yaml").write_text(TINY_PROFILE)
    r = slmops(
        "optimize",
        str(tiny_model),
        "-r",
        str(root / "recipe.yaml"),
        "-o",
        str(root / "variants"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    r = slmops(
        "evaluate",
        str(root / "variants"),
        "--profiles",
        f"rpi5-8gb,{root / 'tiny.yaml'}",
        "--out",
        str(root / "report"),
        "--repeats",
        "2",
        "--max-tokens",
        "16",
        "--windows",
        "6",
        "--window-tokens",
        "64",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selection per device profile" in r.stdout
    return {"root": root, "report": root / "report", "variants": root / "variants"}


def test_report_files_and_selection(evaluated: dict[str, Path]) -> None:
    rep = evaluated["report"]
    data = json.loads((rep / "report.json").read_text())
    assert data["schema"] == "slmops.eval-report/v1"
    assert {v["name"] for v in data["variants"]} == {"f16", "q8", "pruned90", "onnx-int4"}
    q = data["quality"]
    assert q["q8"]["kld_mean"] < q["pruned90"]["kld_mean"]
    for name in ("q8", "onnx-int4"):  # the field baseline, for GGUF and ONNX alike
        base = q[name]["baseline"]
        assert base["prompts"] == 8 and base["max_tokens"] == 64 and base["temperature"] == 0
        assert len(base["logprob"]) == 11 and len(base["output_tokens"]) == 12
        assert sum(base["output_tokens"]) == 8
        assert sum(base["logprob"]) == base["tokens"] <= 8 * 64
    sel = {s["profile"]: s["variant"] for s in data["selections"]}
    assert sel["rpi5-8gb"] in {"f16", "q8", "onnx-int4"}
    assert sel["tiny-mcu"] is None, "nothing fits 20 MiB"
    tiny = [p for p in data["perf"] if p["profile"] == "tiny-mcu"]
    assert tiny and all(p["status"] == "does-not-fit" for p in tiny)
    assert not any(
        p["profile"] == "tiny-mcu" and p["variant"] == "onnx-int4" for p in data["perf"]
    ), "a runtime the device does not have is not measured"
    for f in ("report.md", "report.html"):
        assert (rep / f).stat().st_size > 1000
    assert len(list((rep / "charts").glob("*.png"))) == 4
    assert data["protocol"]["windows"] == 6


def test_gate_exit_codes(evaluated: dict[str, Path]) -> None:
    rep = str(evaluated["report"])
    failed = slmops("gate", rep)
    assert failed.returncode == 1 and "tiny-mcu" in failed.stdout
    ok = slmops("gate", rep, "--require", "rpi5-8gb", "--json")
    assert ok.returncode == 0, ok.stdout
    assert json.loads(ok.stdout)["ok"] is True
    same = slmops("gate", rep, "--baseline", rep, "--require", "rpi5-8gb")
    assert same.returncode == 0
    missing = slmops("gate", str(evaluated["root"] / "nope"))
    assert missing.returncode == 2 and "slmops evaluate" in missing.stderr


def test_profiles_and_bad_input(evaluated: dict[str, Path], tmp_path: Path) -> None:
    r = slmops("profiles", "--json")
    assert r.returncode == 0
    names = {p["name"] for p in json.loads(r.stdout)}
    assert {
        "arm-gateway-2gb",
        "rpi5-8gb",
        "jetson-orin-nano-8gb",
        "x86-minipc-16gb",
        "phone-6gb",
    } <= names
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_PROFILE + "ram_gb: 4\n")
    r = slmops("profiles", "--profile-file", str(bad))
    assert r.returncode == 2 and "ram_gb" in r.stderr and str(bad) in r.stderr
    r = slmops(
        "evaluate",
        str(evaluated["variants"]),
        "--profiles",
        "no-such-device",
        "--out",
        str(tmp_path / "o"),
    )
    assert r.returncode == 2 and "no-such-device" in r.stderr
    r = slmops("evaluate", str(tmp_path), "--profiles", "rpi5-8gb", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no deployable variants" in r.stderr
