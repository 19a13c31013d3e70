"""prune-structured: smaller valid models, and the surgery is exact.

Exactness: removing FFN channels (or KV groups) must give the same logits as the original model
with those channels' (or heads') contributions zeroed; anything else is a slicing bug.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import run_pass_in as run_pass
from slmops.core.errors import ConfigError
from slmops.optimize.passes.base import PassResult, build_pass

PROBE = [[5, 17, 42, 99, 7, 300, 12, 64, 3, 250]]


def load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model


def logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE)).logits


def check_smaller_and_usable(src: Path, out: Path, res: PassResult) -> Any:
    import torch

    assert (out / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    s = res.structure
    assert s is not None and s["parameters_after"] < s["parameters_before"]
    model = load(out)
    assert sum(p.numel() for p in model.parameters()) == s["parameters_after"]
    generated = model.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    return model


def down_proj(model: Any, i: int) -> Any:
    return model.model.layers[i].mlp.down_proj.weight.detach()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_ffn_channels_removed_exactly(
    arch: str, tiny_arch_models: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    src = tiny_arch_models[arch]
    res, out = run_pass("prune-structured", {"target": "ffn", "ratio": 0.5}, src, tmp_path)
    pruned = check_smaller_and_usable(src, out, res)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 64
    assert res.structure is not None
    assert res.structure["before"]["intermediate_size"] == 128
    assert res.structure["after"]["intermediate_size"] == 64
    reference = load(src)
    with torch.no_grad():
        for i in range(2):  # find which channels survived, then silence the others
            original, kept = down_proj(reference, i), down_proj(pruned, i)
            match = (original.T[:, None, :] == kept.T[None, :, :]).all(-1).any(1)
            assert int(match.sum()) == 64
            reference.model.layers[i].mlp.down_proj.weight[:, ~match] = 0
    assert torch.allclose(logits(pruned), logits(reference), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_heads_remove_whole_kv_groups(
    arch: str, tiny_arch_models: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    src = tiny_arch_models[arch]
    res, out = run_pass("prune-structured", {"target": "heads", "ratio": 0.5}, src, tmp_path)
    pruned = check_smaller_and_usable(src, out, res)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 16)
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    reference = load(src)
    assert res.structure is not None
    with torch.no_grad():
        for entry in res.structure["removed"]:
            (group,) = entry["kv_groups"]  # 2 query heads of 16 dims per KV group
            o_proj = reference.model.layers[entry["layer"]].self_attn.o_proj
            o_proj.weight[:, group * 32 : (group + 1) * 32] = 0
    assert torch.allclose(logits(pruned), logits(reference), atol=1e-4)


def test_layers_dropped_by_block_influence(tiny_qwen2: Path, tmp_path: Path) -> None:
    import torch

    opts = {"target": "layers", "ratio": 0.5, "samples": 4, "seqlen": 64}
    res, out = run_pass("prune-structured", opts, tiny_qwen2, tmp_path)
    pruned = check_smaller_and_usable(tiny_qwen2, out, res)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    assert len(cfg.get("layer_types", [None])) == 1
    assert res.structure is not None
    (gone,) = res.structure["removed"]
    influence = res.report["block_influence"]
    assert influence[gone] == min(influence)
    kept = 1 - gone
    reference = load(tiny_qwen2)
    original_q = reference.model.layers[kept].self_attn.q_proj.weight
    assert torch.equal(pruned.model.layers[0].self_attn.q_proj.weight, original_q)
    assert pruned.model.layers[0].self_attn.layer_idx == 0


def test_activation_importance_records_calibration(tiny_model: Path, tmp_path: Path) -> None:
    opts = {"target": "ffn", "ratio": 0.25, "importance": "activation", "samples": 4, "seqlen": 64}
    res, out = run_pass("prune-structured", opts, tiny_model, tmp_path)
    check_smaller_and_usable(tiny_model, out, res)
    assert res.structure is not None and res.structure["after"]["intermediate_size"] == 96
    assert res.report["calibration_digest"].startswith("sha256:")
    assert res.report["importance"] == "activation"


@pytest.mark.parametrize(
    "options",
    [
        {"target": "ffn", "ratio": 0.05},  # rounds back to the full width: nothing removed
        {"target": "heads", "ratio": 0.1},  # 0 of 2 KV groups
        {"target": "layers", "ratio": 0.9, "samples": 2},  # would remove both layers
        {"target": "ffn", "importance": "activation", "calibration": "/nonexistent.txt"},
    ],
)
def test_impossible_requests_fail_before_writing(
    options: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError):
        run_pass("prune-structured", options, tiny_model, tmp_path)
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"target": "ffn", "ratio": 0.0},
        {"target": "ffn", "ratio": 1.0},
        {"target": "attention"},
        {"target": "layers", "importance": "magnitude"},
        {"target": "ffn", "round_to": 0},
        {"target": "ffn", "amount": 0.5},
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build_pass("prune-structured", options)
