"""prune-nm: the N:M pattern is really there in the saved tensors, and keeps the largest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import run_pass_in as run_pass
from slmops.core.errors import ConfigError, ToolError
from slmops.model.hf import PROJECTIONS
from slmops.optimize.passes.base import build_pass


def projections(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    return {
        k: v
        for k, v in weights.items()
        if ".layers." in k and k.endswith(".weight") and k.split(".")[-2] in PROJECTIONS
    }


def test_2_4_groups_in_saved_tensors_keep_the_two_largest(tiny_model: Path, tmp_path: Path) -> None:
    res, out = run_pass("prune-nm", {}, tiny_model, tmp_path)
    before, after = projections(tiny_model), projections(out)
    assert len(after) == 14
    for key, w in after.items():
        groups = w.reshape(w.shape[0], -1, 4)
        assert int((groups != 0).sum(-1).max()) <= 2, key
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), key
        src = before[key].reshape(groups.shape).abs()
        kept = groups != 0
        smallest_kept = src.masked_fill(~kept, float("inf")).min(-1).values
        largest_dropped = src.masked_fill(kept, -1.0).max(-1).values
        assert bool((smallest_kept >= largest_dropped).all()), key
    assert res.sparsity is not None
    assert res.sparsity["pattern"] == "2:4" and res.sparsity["verified"] is True
    assert res.sparsity["groups_checked"] == sum(w.numel() // 4 for w in after.values())


def test_4_8_on_fused_phi3_projections(tiny_arch_models: dict[str, Path], tmp_path: Path) -> None:
    res, out = run_pass("prune-nm", {"n": 4, "m": 8}, tiny_arch_models["phi3"], tmp_path)
    after = projections(out)
    assert any(k.endswith("gate_up_proj.weight") for k in after)
    for key, w in after.items():
        assert int((w.reshape(w.shape[0], -1, 8) != 0).sum(-1).max()) <= 4, key
    assert res.sparsity is not None and res.sparsity["pattern"] == "4:8"


def test_width_not_divisible_by_m_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not divisible by m=48"):
        run_pass("prune-nm", {"n": 2, "m": 48}, tiny_model, tmp_path)
    assert not any((tmp_path / "out").iterdir())


def test_verification_catches_a_dense_group(tiny_model: Path) -> None:
    import torch

    from slmops.model.hf import decoder_linears, load_causal_lm
    from slmops.optimize.passes._prune_common import prune_nm_by_score_, verify_nm

    lm = load_causal_lm(tiny_model)
    with torch.no_grad():
        for _, mod in decoder_linears(lm):
            prune_nm_by_score_(mod.weight, mod.weight.abs(), 2, 4)
        assert verify_nm(lm, 2, 4)["verified"] is True
        _, first = next(iter(decoder_linears(lm)))
        first.weight[0, :4] = 1.0
    with pytest.raises(ToolError, match="keeps 4 nonzeros"):
        verify_nm(lm, 2, 4)


@pytest.mark.parametrize(
    "options", [{"n": 4, "m": 4}, {"n": 5, "m": 4}, {"n": 0, "m": 4}, {"m": 1}, {"k": 2}]
)
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build_pass("prune-nm", options)
