"""KV cache and memory-at-context from the variant's own metadata, checked against the HF config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.core.errors import ModelFormatError
from slmops.evaluate.memory import (
    kv_cache_bytes,
    memory_at_context,
    model_dims,
    runtime_context,
)
from slmops.model.handle import open_model, weights_bytes
from slmops.optimize.passes.base import build_pass


def _export(root: Path, tiny_model: Path, name: str, options: dict[str, str]) -> Path:
    out = root / name
    if not out.exists():
        p = build_pass(name, options)
        p.prepare()
        out.mkdir()
        p.run(open_model(tiny_model), out)
    return out


@pytest.fixture(scope="module")
def variants(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory-variants")
    return {
        "gguf": _export(root, tiny_model, "export-gguf", {"outtype": "f16"}),
        "onnx": _export(root, tiny_model, "export-onnx", {"precision": "int4"}),
        "hf": tiny_model,
    }


def _by_hand(tiny_model: Path, n_ctx: int, bytes_per_elem: int) -> int:
    cfg = json.loads((tiny_model / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return (
        2
        * cfg["num_hidden_layers"]
        * n_ctx
        * cfg["num_key_value_heads"]
        * head_dim
        * bytes_per_elem
    )


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "hf"])
def test_kv_cache_matches_the_hf_dims(
    variants: dict[str, Path], tiny_model: Path, fmt: str
) -> None:
    assert kv_cache_bytes(variants[fmt], 100) == _by_hand(tiny_model, 100, 2)
    assert kv_cache_bytes(variants[fmt], 256, bytes_per_elem=4) == _by_hand(tiny_model, 256, 4)
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert model_dims(variants[fmt]).context_length == cfg["max_position_embeddings"]


@pytest.mark.parametrize(("fmt", "kv_bytes"), [("gguf", 2), ("onnx", 4), ("hf", 4)])
def test_memory_at_context_is_weights_plus_kv_in_the_runtime_dtype(
    variants: dict[str, Path], tiny_model: Path, fmt: str, kv_bytes: int
) -> None:
    expected = weights_bytes(variants[fmt]) + _by_hand(tiny_model, 200, kv_bytes)
    assert memory_at_context(variants[fmt], 200) == expected


def test_context_is_capped_to_the_model(variants: dict[str, Path]) -> None:
    assert runtime_context(variants["gguf"], 4096) == 256  # tiny model: 256 positions
    assert runtime_context(variants["onnx"], 128) == 128


def test_unreadable_gguf_names_the_file(variants: dict[str, Path], tmp_path: Path) -> None:
    data = next(variants["gguf"].glob("*.gguf")).read_bytes()
    (tmp_path / "model.gguf").write_bytes(data[:2000])
    with pytest.raises(ModelFormatError, match=r"model\.gguf"):
        kv_cache_bytes(tmp_path, 128)
