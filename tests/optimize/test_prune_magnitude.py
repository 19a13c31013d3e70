"""prune-magnitude: measured sparsity in the saved weights, scopes, memory-flat threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import run_pass_in as run_pass
from slmops.core.errors import ConfigError
from slmops.model.handle import open_model
from slmops.model.hf import PROJECTIONS
from slmops.optimize.passes.base import build_pass


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def is_projection(key: str) -> bool:
    parts = key.split(".")
    return ".layers." in key and key.endswith(".weight") and parts[-2] in PROJECTIONS


def test_per_layer_prunes_every_projection_to_target_and_nothing_else(
    tiny_model: Path, tmp_path: Path
) -> None:
    res, out = run_pass("prune-magnitude", {"sparsity": 0.5}, tiny_model, tmp_path)
    before, after = tensors(tiny_model), tensors(out)
    projections = [k for k in after if is_projection(k)]
    assert len(projections) == 2 * 7
    for key in projections:
        frac = float((after[key] == 0).float().mean())
        assert frac == pytest.approx(0.5, abs=0.005), key
    for key in after:  # embeddings, norms, lm_head untouched
        if not is_projection(key):
            assert bool((after[key] == before[key]).all()), key
    assert res.sparsity is not None
    assert res.sparsity["overall"] == pytest.approx(0.5, abs=0.005)
    assert res.sparsity["target"] == 0.5 and res.sparsity["method"] == "magnitude"
    assert set(res.report["per_layer_sparsity"]) == {"0", "1"}


def test_global_scope_uses_one_threshold_across_projections(
    tiny_model: Path, tmp_path: Path
) -> None:
    res, out = run_pass(
        "prune-magnitude", {"sparsity": 0.6, "scope": "global"}, tiny_model, tmp_path
    )
    before, after = tensors(tiny_model), tensors(out)
    keys = [k for k in after if is_projection(k)]
    total = sum(after[k].numel() for k in keys)
    zeros = sum(int((after[k] == 0).sum()) for k in keys)
    assert zeros / total == pytest.approx(0.6, abs=0.005)
    fractions = [float((after[k] == 0).float().mean()) for k in keys]
    assert max(fractions) - min(fractions) > 0.05  # not uniform, unlike per-layer
    largest_pruned = max(float(before[k][after[k] == 0].abs().max()) for k in keys)
    smallest_kept = min(float(after[k][after[k] != 0].abs().min()) for k in keys)
    assert largest_pruned <= smallest_kept
    assert res.sparsity is not None and res.sparsity["threshold_scope"] == "global"


def test_kth_smallest_abs_matches_a_full_sort_without_concatenating() -> None:
    import torch

    from slmops.optimize.passes._prune_common import kth_smallest_abs

    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(300, 70, generator=gen), torch.randn(5000, generator=gen) * 3]
    parts.append(torch.zeros(900))  # ties at zero, like an already pruned tensor
    everything = torch.cat([p.reshape(-1) for p in parts]).abs()
    for k in (1, 500, 901, 12_345, everything.numel() // 2, everything.numel()):
        expected = float(everything.kthvalue(k).values)
        # a tiny gather limit forces several rounds of histogram refinement
        assert kth_smallest_abs(parts, k, bins=16, gather_limit=64) == expected, k
        assert kth_smallest_abs(parts, k) == expected, k


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_every_architecture(arch: str, tiny_arch_models: dict[str, Path], tmp_path: Path) -> None:
    res, out = run_pass("prune-magnitude", {"sparsity": 0.5}, tiny_arch_models[arch], tmp_path)
    after = tensors(out)
    keys = [k for k in after if is_projection(k)]
    assert keys
    zeros = sum(int((after[k] == 0).sum()) for k in keys)
    measured = zeros / sum(after[k].numel() for k in keys)
    assert measured == pytest.approx(0.5, abs=0.005)
    assert res.sparsity is not None
    assert res.sparsity["overall"] == pytest.approx(measured, abs=1e-5)
    assert open_model(out).architecture == arch
    if arch == "phi3":
        assert any(k.endswith("qkv_proj.weight") for k in keys)


@pytest.mark.parametrize(
    "options",
    [{"sparsity": 1.0}, {"sparsity": -0.1}, {"scope": "local"}, {"sparsity": 0.5, "typo": 1}],
)
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build_pass("prune-magnitude", options)
