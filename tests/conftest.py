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
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common: dict[str, int] = dict(
        vocab_size=640,  # padded beyond the tokenizer, as real Qwen2/Phi-3 checkpoints are
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    if arch == "phi3":
        # A short-context Phi-3 (as Phi-3-mini-4k is): no LongRoPE scaling.
        common["original_max_position_embeddings"] = common["max_position_embeddings"]
    cfg = AutoConfig.for_model(arch, **common)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "calibration.txt",
        "heldout.txt",
    ):
        if (tokenizer_from / name).exists():
            shutil.copy2(tokenizer_from / name, out / name)
    # Keep the generic fast tokenizer: without this AutoTokenizer picks the architecture's own
    # tokenizer class (e.g. Qwen2Tokenizer), which adds special tokens beyond the tiny vocab.
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    # Phi-4-style byte-level BPE is declared as GPT2Tokenizer, which llama.cpp's Phi-3 converter
    # reads as a BPE vocabulary (Phi-3-mini itself ships a SentencePiece tokenizer.model).
    tok_cfg["tokenizer_class"] = "GPT2Tokenizer" if arch == "phi3" else "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out


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
