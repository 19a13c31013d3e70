"""Memory a variant needs at a context length: weights plus the KV cache, from the model's dims.

A measured peak RSS only covers the short prompt the perf harness runs; a device serving long
conversations also holds a KV cache that grows to the full context. That part is computed, not
measured: 2 (K and V) x layers x context x KV heads x head size x bytes per element.

The dims are read from the variant itself (GGUF metadata, genai_config.json, or the HF
config.json), never from the reference model, so a structurally pruned variant is sized right.
Heavy readers (gguf, onnx) are imported inside the functions that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.core.errors import ModelFormatError
from slmops.model.handle import ModelFormat, detect_format, load_hf_config, weights_bytes

# KV cache element size each runtime uses by default: llama.cpp keeps K and V in f16; the CPU
# ONNX GenAI export and the transformers reference run in float32.
DEFAULT_KV_BYTES = {ModelFormat.GGUF: 2, ModelFormat.ONNX: 4, ModelFormat.HF: 4}


@dataclass(frozen=True)
class ModelDims:
    """What sizes the KV cache; context_length is the model's maximum (None when not stated)."""

    layers: int
    kv_heads: int
    key_length: int
    value_length: int
    context_length: int | None

    def kv_bytes_per_token(self, bytes_per_elem: int) -> int:
        return self.layers * self.kv_heads * (self.key_length + self.value_length) * bytes_per_elem


def _gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if not files:
        raise ModelFormatError("no .gguf file", where=path)
    return files[0]


def _gguf_dims(path: Path) -> ModelDims:
    from slmops.model.gguf_info import gguf_reader

    file = _gguf_file(path)
    try:
        fields = gguf_reader(file).fields
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise ModelFormatError(f"cannot read GGUF metadata: {exc}", where=file) from None

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        if f is None:
            if default is None:
                raise ModelFormatError(f"GGUF metadata lacks {key}", where=file)
            return default
        return f.contents()

    arch = str(get("general.architecture"))
    heads = int(get(f"{arch}.attention.head_count"))
    head_dim = int(get(f"{arch}.embedding_length")) // heads
    key_len = int(get(f"{arch}.attention.key_length", head_dim))
    ctx = fields.get(f"{arch}.context_length")
    return ModelDims(
        layers=int(get(f"{arch}.block_count")),
        kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        key_length=key_len,
        value_length=int(get(f"{arch}.attention.value_length", key_len)),
        context_length=int(ctx.contents()) if ctx is not None else None,
    )


def _onnx_dims(path: Path) -> ModelDims:
    cfg_path = path / "genai_config.json"
    try:
        model = json.loads(cfg_path.read_text(encoding="utf-8"))["model"]
        dec = model["decoder"]
        head = int(dec["head_size"])
        return ModelDims(
            layers=int(dec["num_hidden_layers"]),
            kv_heads=int(dec.get("num_key_value_heads", dec["num_attention_heads"])),
            key_length=head,
            value_length=head,
            context_length=int(model["context_length"]) if "context_length" in model else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"cannot read the model dims: {exc!r}", where=cfg_path) from None


def _hf_dims(path: Path) -> ModelDims:
    cfg = load_hf_config(path)
    try:
        heads = int(cfg["num_attention_heads"])
        head = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        ctx = cfg.get("max_position_embeddings")
        return ModelDims(
            layers=int(cfg["num_hidden_layers"]),
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            key_length=head,
            value_length=head,
            context_length=int(ctx) if ctx is not None else None,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelFormatError(f"config.json lacks a model dim: {exc!r}", where=path) from None


def model_dims(variant_dir: Path) -> ModelDims:
    """Dims of a variant in any format; ModelFormatError (with the file) when unreadable."""
    fmt = detect_format(variant_dir)
    if fmt is ModelFormat.GGUF:
        return _gguf_dims(variant_dir)
    if fmt is ModelFormat.ONNX:
        return _onnx_dims(variant_dir)
    return _hf_dims(variant_dir)


def runtime_context(variant_dir: Path, wanted: int) -> int:
    """The context to load with: what the profile wants, capped to what the model supports."""
    ctx = model_dims(variant_dir).context_length
    return min(wanted, ctx) if ctx else wanted


def kv_cache_bytes(variant_dir: Path, n_ctx: int, bytes_per_elem: int = 2) -> int:
    """KV cache bytes for `n_ctx` tokens (K and V, every layer, every KV head)."""
    return n_ctx * model_dims(variant_dir).kv_bytes_per_token(bytes_per_elem)


def memory_at_context(variant_dir: Path, n_ctx: int) -> int:
    """Weights on disk + KV cache at `n_ctx` in the element size the variant's runtime uses.

    A lower bound on what serving that context costs: runtime code, the interpreter and compute
    buffers come on top (the measured peak RSS shows them for a short prompt).
    """
    kv = kv_cache_bytes(variant_dir, n_ctx, DEFAULT_KV_BYTES[detect_format(variant_dir)])
    return weights_bytes(variant_dir) + kv
