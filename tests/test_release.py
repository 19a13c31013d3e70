"""build_release: optimize -> evaluate -> bundle -> sign, as one wiring.

Run in a child interpreter: the evaluation imports PyPI's `gguf`, which must not leak into
in-process GGUF exports of other test modules (see tests/agent/conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
from pathlib import Path
from slmops.bundle.signing import init_keys
from slmops.bundle.verify import verify_bundle
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.runner import EvalOptions
from slmops.optimize.recipe import RecipeFile, compile_recipe
from slmops.release import build_release

model, work, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
recipe_doc = {
    "name": "release-test",
    "variants": {
        "gguf-q8_0": [{"export-gguf": {"outtype": "f16"}}, {"quantize-gguf": {"type": "Q8_0"}}],
        # keeps 256 of 128 FFN channels: refused when the pass runs
        "broken": [{"prune-structured": {"target": "ffn", "ratio": 0.5, "round_to": 256}},
                   {"export-gguf": {}}],
    },
}
recipe = compile_recipe(RecipeFile.model_validate(recipe_doc), source="test")
profile = DeviceProfile.model_validate({
    "name": "test-box", "arch": "x86_64", "cores": 2, "ram_mb": 4096, "storage_mb": 32768,
    "runtimes": ["gguf"], "context_length": 256, "relative_speed": 1.0,
    "budgets": {"max_ttft_ms": 100000, "min_decode_tps": 0.1, "max_kld": 100},
    "cost": {"hardware_usd": 80, "lifetime_years": 5, "power_watts": 7},
})
priv, pub = init_keys(work / "keys")
options = EvalOptions(repeats=1, max_tokens=8, windows=2, window_tokens=64, greedy_prompts=1,
                      threads=1, baseline_tokens=0)
veto = (lambda report, built: ["vetoed by the test"]) if mode == "veto" else None
rel = build_release(model, recipe, work, profiles=[profile], name="acme/rel", version="1.0.0",
                    private_key=priv, options=options, skip_failed_variants=True,
                    check=veto)
verified = None
if rel.signed:
    verified = verify_bundle(rel.bundle_dir, [pub]).digest
print(json.dumps({
    "signed": rel.signed, "reasons": rel.reasons, "failed": sorted(rel.failed),
    "variants": rel.variants, "picked": [s.variant for s in rel.report.selections],
    "bundle_digest": rel.bundle.digest, "verified": verified,
    "bundle_variants": rel.bundle.variants,
}))
"""


def _release(model: Path, work: Path, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), str(work), mode],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["skip", "veto"])
def test_build_release_skips_unbuildable_variants_and_signs_only_when_accepted(
    tiny_model: Path, tmp_path: Path, mode: str
) -> None:
    res = _release(tiny_model, tmp_path / "w", mode)
    assert res["failed"] == ["broken"]
    assert res["variants"] == ["gguf-q8_0"] == res["bundle_variants"]
    assert res["picked"] == ["gguf-q8_0"]
    if mode == "veto":
        assert not res["signed"] and res["reasons"] == ["vetoed by the test"]
        assert res["verified"] is None
        assert not list((tmp_path / "w" / "bundle").glob("*.sig"))
    else:
        assert res["signed"] and res["reasons"] == []
        assert res["verified"] == res["bundle_digest"]
