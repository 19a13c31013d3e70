"""Tiny random-weight models of every architecture family, for tests/optimize/test_architectures
and the conftest fixtures (`build_random` is the one builder both use).

Each model is built from its architecture's config (hidden 64, 2 layers, 4 heads, 2 KV heads,
intermediate 128) with the tiny trained model's tokenizer and a padded vocabulary (640 embedding
rows for 512 tokenizer ids, as real Qwen/Gemma checkpoints pad). Families whose llama.cpp
converter only reads a SentencePiece vocabulary also get a tokenizer.model trained offline on the
tiny model's calibration text. The overrides exercise what differs between families: explicit
head_dim != hidden/heads, sliding-window layers (layer_types), tied embeddings, q/k norms.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

COMMON: dict[str, Any] = dict(
    vocab_size=640,
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
SLIDING = ["sliding_attention", "full_attention"]

# model_type -> (config overrides, needs a SentencePiece tokenizer.model)
FAMILIES: dict[str, tuple[dict[str, Any], bool]] = {
    "llama": ({}, False),
    "mistral": ({"sliding_window": None}, False),
    "qwen2": ({"tie_word_embeddings": True}, False),
    "qwen3": ({"head_dim": 32}, False),  # per-head q/k norms, head_dim != hidden/heads
    "gemma": ({"head_dim": 32}, True),  # GeGLU, tied embeddings
    "gemma2": ({"head_dim": 32, "sliding_window": 16, "layer_types": SLIDING}, True),
    "gemma3_text": ({"head_dim": 32, "sliding_window": 16, "layer_types": SLIDING}, True),
    "phi3": ({"original_max_position_embeddings": 256}, False),  # fused qkv / gate_up
    "smollm3": ({}, False),  # no_rope_layers
    "granite": ({}, False),
    "olmo": ({}, False),  # non-parametric layer norms
    "olmo2": ({}, False),  # full-width q/k norms
    # Non-gated relu^2 MLP: pruning refused up front. hidden 128 (head_dim 32) because its
    # partial rotary factor 0.5 must leave a cos/sin cache width that is a multiple of 8 for
    # ORT's kernel, and llama.cpp's Nemotron loader assumes head_dim == hidden / heads.
    "nemotron": ({"hidden_size": 128}, True),
}


def train_sentencepiece(text_file: Path, out: Path) -> Path:
    """A 400-piece SentencePiece model trained offline on a few KB of text."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "spm"
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=0,
        eos_id=1,
        pad_id=2,
        unk_id=3,
        input_sentence_size=20000,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def build_random(
    out: Path, model_type: str, tokenizer_from: Path, overrides: dict[str, Any]
) -> Path:
    """Save a tiny random `model_type` model (`COMMON` + `overrides`) into `out`, with the tiny
    model's tokenizer, calibration and held-out files copied from `tokenizer_from`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
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
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    # The generic fast tokenizer reads tokenizer.json as is (an architecture's own class, e.g.
    # Qwen2Tokenizer, would add special tokens beyond the tiny vocabulary); Phi-4-style byte-level
    # BPE is declared as GPT2Tokenizer, which llama.cpp's Phi-3 converter reads as a BPE
    # vocabulary (Phi-3-mini itself ships a SentencePiece tokenizer.model).
    tok_cfg["tokenizer_class"] = (
        "GPT2Tokenizer" if model_type == "phi3" else "PreTrainedTokenizerFast"
    )
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out


def build_family(out: Path, model_type: str, tokenizer_from: Path, spm_model: Path | None) -> Path:
    """Save a tiny random `model_type` model into `out` with the shared tokenizer files."""
    overrides, needs_spm = FAMILIES[model_type]
    if needs_spm and spm_model is None:
        raise ValueError(f"{model_type} needs a SentencePiece model")
    build_random(out, model_type, tokenizer_from, overrides)
    if spm_model is not None and needs_spm:
        shutil.copy2(spm_model, out / "tokenizer.model")
    return out
