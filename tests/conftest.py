"""Shared fixtures: tiny real models built from configs (no hub), cached per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained Llama (vocab 512, hidden 64, 2 layers, GQA) with its own BPE tokenizer."""
    from slmops.model.demo import train_demo_model

    root = tmp_path_factory.mktemp("tiny")
    res = train_demo_model(root / "model", size="tiny", steps=30, seed=0, cache_dir=root / "cache")
    return res.path


def _random_model(out: Path, arch: str, tokenizer_from: Path) -> Path:
    """A randomly initialised model of another Llama-family architecture sharing the tiny tokenizer."""
    from arch_models import build_random

    # A short-context Phi-3 (as Phi-3-mini-4k is): no LongRoPE scaling.
    overrides = {"original_max_position_embeddings": 256} if arch == "phi3" else {}
    return build_random(out, arch, tokenizer_from, overrides)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    return _random_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2", tiny_model)


@pytest.fixture(scope="session")
def tiny_arch_models(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_qwen2: Path
) -> dict[str, Path]:
    """Tiny models for every supported architecture family (random weights except llama)."""
    out = {"llama": tiny_model, "qwen2": tiny_qwen2}
    for arch in ("mistral", "phi3"):
        out[arch] = _random_model(tmp_path_factory.mktemp(arch) / "model", arch, tiny_model)
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
