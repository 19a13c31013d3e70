"""Every pass on every architecture family: it runs, or it is refused up front with the reason.

Tiny random-weight models (tests/arch_models.py) of 13 families go through both exports (each
output loaded and generating in llama.cpp or onnxruntime-genai), the unstructured pruning passes
(forward in transformers, sparsity measured) and a chain of structured cuts (heads, FFN, layers:
shapes checked after each, the result exported to GGUF and run in llama.cpp). A recipe naming a
pass that cannot handle the model is refused by the CLI before any step runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from arch_models import FAMILIES, build_family, train_sentencepiece
from helpers import run_cli, run_pass
from slmops.core.errors import UserInputError
from slmops.model.arch import GGUF_ATTENTION_IS_HIDDEN_WIDE, ArchInfo, read_arch
from slmops.optimize.passes.base import build_pass, get_pass_class

FAMILY_NAMES = list(FAMILIES)
# Families whose MLP is not gated: every pruning pass must be refused up front.
NON_GATED = {"nemotron"}
PRUNE_UNSTRUCTURED = {
    "prune-magnitude": {"sparsity": 0.5},
    "prune-nm": {"n": 2, "m": 4},
    "prune-wanda": {"sparsity": 0.5, "samples": 2, "seqlen": 32},
}


@pytest.fixture(scope="session")
def family_model(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Callable[[str], Path]:
    """Builds each family's tiny model once per session, on first use."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}
    spm: list[Path] = []

    def get(model_type: str) -> Path:
        if model_type not in built:
            if FAMILIES[model_type][1] and not spm:
                spm.append(train_sentencepiece(tiny_model / "calibration.txt", root / "spm"))
            # The folder is named "model": llama.cpp derives general.name from it, and a name
            # containing "phi3" makes its loader demand Phi-3's <unk>/<s>/<|endoftext|> tokens.
            built[model_type] = build_family(
                root / model_type / "model", model_type, tiny_model, spm[0] if spm else None
            )
        return built[model_type]

    return get


def _generate(path: Path) -> list[int]:
    from slmops.runtimes import open_runtime

    rt = open_runtime(path, threads=2, n_ctx=128)
    try:
        ids, _ = rt.generate([0, 5, 6, 7], max_tokens=4, stop_at_eos=False)
    finally:
        rt.close()
    return ids


def _forward_shapes(path: Path) -> dict[str, Any]:
    """Reload a pruned folder with transformers, run a forward pass, report its shapes."""
    import torch

    from slmops.model.hf import decoder_layers, load_causal_lm

    lm = load_causal_lm(path)
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([[0, 5, 6, 7, 8, 9]]), use_cache=False).logits
    assert bool(torch.isfinite(logits).all())
    layer = decoder_layers(lm)[0]
    attn, mlp = layer.self_attn, layer.mlp
    q = attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.q_proj
    up = mlp.gate_up_proj if hasattr(mlp, "gate_up_proj") else mlp.up_proj
    return {
        "layers": len(decoder_layers(lm)),
        "q_rows": q.weight.shape[0],
        "o_cols": attn.o_proj.weight.shape[1],
        "up_rows": up.weight.shape[0],
        "vocab": logits.shape[-1],
        "config": lm.config,
    }


def _refusal(arch: ArchInfo, pass_name: str, options: dict[str, Any] | None = None) -> list[str]:
    return build_pass(pass_name, options or {}).check_model(arch)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_structure_read_from_files(family_model: Callable[[str], Path], family: str) -> None:
    arch = read_arch(family_model(family))
    assert arch.decoder_only and arch.model_type == family
    assert arch.vocab_rows == 640 and arch.tokenizer_ids == 512 and arch.padded_vocab
    assert arch.num_layers == 2 and arch.num_key_value_heads == 2
    expected = {
        "qwen3": {"qk_norm": "per_head", "explicit_head_dim": True, "head_dim": 32},
        "gemma3_text": {
            "qk_norm": "per_head",
            "glu": "GeGLU",
            "layer_types": [
                "sliding_attention",
                "full_attention",
            ],
        },
        "gemma": {"glu": "GeGLU", "tied_embeddings": True},
        "olmo2": {"qk_norm": "full"},
        "phi3": {"attention": "fused_qkv", "mlp": "fused_gate_up"},
        "nemotron": {"mlp": "non_gated", "glu": None},
        "qwen2": {"tied_embeddings": True, "attention_bias": True},
        "llama": {"attention": "qkvo", "mlp": "gated", "glu": "SwiGLU", "qk_norm": "none"},
    }.get(family, {})
    for key, value in expected.items():
        assert getattr(arch, key) == value, f"{family}.{key}"
    # Both converters' lists were read from their sources.
    assert arch.llama_cpp_converter is True, family
    assert arch.onnx_genai_builder is not None


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_exports_load_and_generate(
    family_model: Callable[[str], Path], tmp_path: Path, family: str
) -> None:
    src = family_model(family)
    arch = read_arch(src)
    # GGUF: f16 export, Q8_0 quantization, loaded and generating in llama.cpp.
    assert _refusal(arch, "export-gguf") == []
    f16 = tmp_path / "f16"
    run_pass("export-gguf", {"outtype": "f16"}, src, f16)
    q8 = tmp_path / "q8"
    run_pass("quantize-gguf", {"type": "Q8_0"}, f16, q8)
    assert len(_generate(q8)) == 4
    # ONNX GenAI: int4 build, loaded and generating in onnxruntime-genai, or refused with why.
    missing = _refusal(arch, "export-onnx")
    if arch.onnx_genai_builder is False:
        assert missing and arch.architecture in missing[0]
        return
    assert missing == []
    onnx = tmp_path / "onnx"
    run_pass("export-onnx", {"precision": "int4"}, src, onnx)
    assert len(_generate(onnx)) == 4


@pytest.mark.parametrize("pass_name", list(PRUNE_UNSTRUCTURED))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unstructured_pruning(
    family_model: Callable[[str], Path], tmp_path: Path, family: str, pass_name: str
) -> None:
    src = family_model(family)
    arch = read_arch(src)
    options = PRUNE_UNSTRUCTURED[pass_name]
    missing = _refusal(arch, pass_name, options)
    if family in NON_GATED:
        assert any("gated MLP" in m for m in missing), missing
        return
    assert missing == []
    res = run_pass(pass_name, options, src, tmp_path / "out")
    assert res.sparsity is not None and 0.45 <= res.sparsity["overall"] <= 0.55
    shapes = _forward_shapes(tmp_path / "out")
    assert shapes["vocab"] == 640 and shapes["layers"] == 2


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_structured_pruning_shapes_and_gguf(
    family_model: Callable[[str], Path], tmp_path: Path, family: str
) -> None:
    src = family_model(family)
    arch = read_arch(src)
    heads = {"target": "heads", "ratio": 0.5}
    ffn = {"target": "ffn", "ratio": 0.5, "round_to": 32}
    layers = {"target": "layers", "ratio": 0.5, "samples": 2, "seqlen": 32}
    if family in NON_GATED:
        for options in (heads, ffn, layers):
            missing = _refusal(arch, "prune-structured", options)
            assert any(f"target {options['target']}" in m and "gated MLP" in m for m in missing), (
                missing
            )
        return
    hd = arch.head_dim
    # Heads: one of two KV groups removed, with its query heads (and OLMo 2's norm slices).
    assert _refusal(arch, "prune-structured", heads) == []
    run_pass("prune-structured", heads, src, tmp_path / "heads")
    shapes = _forward_shapes(tmp_path / "heads")
    cfg = shapes["config"]
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2 and cfg.head_dim == hd
    assert shapes["q_rows"] == (4 * hd if arch.attention == "fused_qkv" else 2 * hd)
    assert shapes["o_cols"] == 2 * hd
    pruned = read_arch(tmp_path / "heads")
    assert pruned.qk_norm == arch.qk_norm
    missing = _refusal(pruned, "export-gguf")
    if arch.architecture in GGUF_ATTENTION_IS_HIDDEN_WIDE and 2 * hd != arch.hidden_size:
        assert any("heads x head_dim" in m for m in missing), missing
    else:
        assert missing == []
        run_pass("export-gguf", {"outtype": "f16"}, tmp_path / "heads", tmp_path / "heads-gguf")
        assert len(_generate(tmp_path / "heads-gguf")) == 4
    # FFN channels, then whole layers (layer_types sliced with them), then GGUF.
    run_pass("prune-structured", ffn, src, tmp_path / "ffn")
    shapes = _forward_shapes(tmp_path / "ffn")
    assert shapes["config"].intermediate_size == 64
    assert shapes["up_rows"] == (128 if arch.mlp == "fused_gate_up" else 64)
    run_pass("prune-structured", layers, tmp_path / "ffn", tmp_path / "layers")
    shapes = _forward_shapes(tmp_path / "layers")
    cfg = shapes["config"]
    assert shapes["layers"] == 1 and cfg.num_hidden_layers == 1 and cfg.intermediate_size == 64
    if arch.layer_types:
        assert len(cfg.layer_types) == 1
    assert _refusal(read_arch(tmp_path / "layers"), "export-gguf") == []
    run_pass("export-gguf", {"outtype": "f16"}, tmp_path / "layers", tmp_path / "gguf")
    assert len(_generate(tmp_path / "gguf")) == 4


def test_chain_is_checked_with_the_structure_each_step_receives(
    family_model: Callable[[str], Path],
) -> None:
    """prune heads -> export-gguf on Qwen2 is refused up front: the pruned attention is no
    longer hidden_size wide, which llama.cpp's Qwen2 loader assumes."""
    from slmops.model.handle import open_model
    from slmops.optimize.engine import preflight
    from slmops.optimize.recipe import RecipeFile, compile_recipe

    raw = RecipeFile.model_validate(
        {
            "variants": {
                "heads-gguf": [
                    {"prune-structured": {"target": "heads", "ratio": 0.5}},
                    "export-gguf",
                ],
                "ffn-gguf": [{"prune-structured": {"target": "ffn", "ratio": 0.5}}, "export-gguf"],
            }
        }
    )
    recipe = compile_recipe(raw)
    with pytest.raises(UserInputError) as exc:
        preflight(open_model(family_model("qwen2")), recipe, list(recipe.variants))
    assert "variant 'heads-gguf': pass 'export-gguf'" in exc.value.message
    assert "Qwen2ForCausalLM" in exc.value.message and "heads x head_dim" in exc.value.message
    assert "ffn-gguf" not in exc.value.message


def test_unknown_architecture_is_refused_by_both_exports(tiny_model: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["TinyFooForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    arch = read_arch(d)
    assert arch.llama_cpp_converter is False and arch.onnx_genai_builder is False
    assert "TinyFooForCausalLM" in _refusal(arch, "export-gguf")[0]
    assert "onnxruntime-genai" in _refusal(arch, "export-onnx")[0]
    # The pruning passes read structure, not the name: they still apply.
    assert get_pass_class("prune-wanda").check(arch) == []


def test_tokenizer_larger_than_embedding_is_refused(
    family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    d = tmp_path / "m"
    shutil.copytree(family_model("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 300
    (d / "config.json").write_text(json.dumps(cfg))
    for f in d.glob("*.safetensors"):  # the header now disagrees; read_arch trusts the weights
        f.unlink()
    (d / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    missing = _refusal(read_arch(d), "export-gguf")
    assert any("tokenizer ids (512) <= embedding rows (300)" in m for m in missing), missing


def test_recipe_refused_before_any_step(
    family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    src = tmp_path / "nemotron"
    shutil.copytree(family_model("nemotron"), src)
    (src / "tokenizer.model").unlink()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: mixed\nvariants:\n"
        "  onnx-int4:\n    - export-onnx: {precision: int4}\n"
        "  gguf-f16:\n    - export-gguf: {outtype: f16}\n"
        "  ffn50:\n    - prune-structured: {target: ffn, ratio: 0.5}\n    - export-gguf\n"
    )
    out = tmp_path / "out"
    proc = run_cli("optimize", str(src), "--out", str(out), "--recipe", str(recipe), "--json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not out.exists()
    err = json.loads(proc.stdout) if proc.stdout.strip() else {}
    message = err.get("message", "") or proc.stderr
    assert "variant 'gguf-f16': pass 'export-gguf'" in message
    assert "variant 'ffn50': pass 'prune-structured'" in message
    assert "NemotronForCausalLM" in message
    assert "tokenizer.model" in message and "gated MLP" in message
    assert "onnx-int4" not in message


def test_cli_shows_which_passes_apply(family_model: Callable[[str], Path]) -> None:
    src = family_model("nemotron")
    proc = run_cli("passes", "--model", str(src), "--json")
    assert proc.returncode == 0, proc.stderr
    passes = {p["name"]: p for p in json.loads(proc.stdout)}
    assert passes["export-gguf"]["applies"] is True
    assert passes["prune-wanda"]["applies"] is False
    assert any("gated MLP" in w for w in passes["prune-wanda"]["why_not"])
    info = run_cli("model", "info", str(src), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["arch"]["architecture"] == "NemotronForCausalLM"
    assert data["arch"]["mlp"] == "non_gated"
    assert data["passes"]["prune-nm"]["applies"] is False
    text = run_cli("model", "info", str(src))
    assert "non_gated" in text.stdout and "prune-wanda" in text.stdout


def test_gemma3_without_sentencepiece_and_padded_vocab_is_refused(
    family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    d = tmp_path / "model"
    shutil.copytree(family_model("gemma3_text"), d)
    (d / "tokenizer.model").unlink()
    missing = _refusal(read_arch(d), "export-gguf")
    assert any("Gemma 3 converter" in m and "(640)" in m for m in missing), missing
