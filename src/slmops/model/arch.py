"""What a Hugging Face model is made of, read from its files without loading a tensor.

Passes used to accept a fixed list of architecture names; a new family (Qwen3, Gemma 3, OLMo 2,
...) was refused even when its layers are the same q/k/v/o + gate/up/down blocks. Instead we read
the structure: config.json for the numbers, the safetensors headers for the tensor names and
shapes (fused or separate projections, per-head or full-width q/k norms, tied embeddings, padded
embedding rows), the tokenizer files for how many ids the tokenizer really uses, and the sources
of the two converters (llama.cpp's convert_hf_to_gguf and onnxruntime-genai's model builder) for
the architecture names they know. Each pass checks an `ArchInfo` against what it needs.

Nothing here imports torch or transformers: `slmops model info` and `slmops passes --model` stay
fast and work on a machine with only the base install.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.core.errors import ModelFormatError
from slmops.model.converters import llama_cpp_architectures, onnx_genai_architectures

# Architectures whose llama.cpp converter reads only a SentencePiece tokenizer.model (their
# set_vocab calls _set_vocab_sentencepiece unconditionally). Phi-3 is conditional: see below.
GGUF_NEEDS_SENTENCEPIECE = frozenset(
    {"GemmaForCausalLM", "Gemma2ForCausalLM", "NemotronForCausalLM"}
)
# llama.cpp architectures whose loader builds the attention tensors as hidden x hidden, so a
# model with num_heads * head_dim != hidden_size (e.g. after removing KV groups) converts but does
# not load. Measured with the llama.cpp of llama-cpp-python 0.3.36 (its C++ sources are not
# shipped with the converter, so this cannot be read from the tools like the lists below).
GGUF_ATTENTION_IS_HIDDEN_WIDE = frozenset(
    {
        "Qwen2ForCausalLM",
        "Phi3ForCausalLM",
        "GraniteForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "NemotronForCausalLM",
    }
)
_LAYER = re.compile(r"^(?P<prefix>(?:[\w.]*\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class ArchInfo:
    """Structural facts about one HF model folder; see `read_arch`."""

    path: str
    architecture: str
    model_type: str
    decoder_only: bool
    # "qkvo" (separate q/k/v/o), "fused_qkv" (qkv_proj + o_proj), or "other"
    attention: str
    # "gated" (gate/up/down), "fused_gate_up" (gate_up_proj + down_proj), "non_gated"
    # (up/down only), or "other"
    mlp: str
    activation: str | None
    # "SwiGLU", "GeGLU", another gated unit, or None for non-gated MLPs
    glu: str | None
    # "none", "per_head" (norm over head_dim, Qwen3/Gemma 3), "full" (over the projection, OLMo 2)
    qk_norm: str
    tied_embeddings: bool
    sliding_window: int | None
    layer_types: list[str] | None
    num_layers: int
    hidden_size: int
    intermediate_size: int | None
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    explicit_head_dim: bool
    vocab_rows: int
    tokenizer_ids: int | None
    # len(model.vocab) + len(added_tokens) of tokenizer.json (llama.cpp's Gemma 3 converter
    # trims the embedding to this many rows when there is no tokenizer.model)
    tokenizer_json_entries: int | None
    tokenizer_files: list[str]
    tokenizer_class: str | None
    rope: bool
    rope_type: str | None
    attention_bias: bool
    layer_prefix: str | None
    unknown_layer_tensors: list[str] = field(default_factory=list)
    llama_cpp_converter: bool | None = None
    onnx_genai_builder: bool | None = None

    @property
    def padded_vocab(self) -> bool:
        return self.tokenizer_ids is not None and self.vocab_rows > self.tokenizer_ids

    @property
    def gqa_groups(self) -> int:
        return self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["padded_vocab"] = self.padded_vocab
        return data


def read_arch(path: Path) -> ArchInfo:
    """Read an HF folder's structure (config, safetensors headers, tokenizer); no tensor loads."""
    from slmops.model.handle import load_hf_config

    cfg = load_hf_config(path)
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    c: dict[str, Any] = {**cfg, **(text_cfg or {})}
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else ""
    shapes = _tensor_shapes(path)
    layer0, prefix = _layer0(shapes)
    names = set(layer0)

    def has(*suffixes: str) -> bool:
        return all(any(n.endswith(s + ".weight") for n in names) for s in suffixes)

    if has("q_proj", "k_proj", "v_proj", "o_proj"):
        attention = "qkvo"
    elif has("qkv_proj", "o_proj"):
        attention = "fused_qkv"
    else:
        attention = "other"
    if has("gate_proj", "up_proj", "down_proj"):
        mlp = "gated"
    elif has("gate_up_proj", "down_proj"):
        mlp = "fused_gate_up"
    elif has("up_proj", "down_proj"):
        mlp = "non_gated"
    else:
        mlp = "other"

    heads = int(c.get("num_attention_heads") or 0)
    kv = int(c.get("num_key_value_heads") or heads)
    hidden = int(c.get("hidden_size") or 0)
    hd_cfg = c.get("head_dim")
    head_dim = int(hd_cfg) if hd_cfg else (hidden // heads if heads else 0)
    activation = c.get("hidden_activation") or c.get("hidden_act") or c.get("activation_function")
    glu = None
    if mlp in ("gated", "fused_gate_up"):
        glu = {"silu": "SwiGLU", "swish": "SwiGLU"}.get(str(activation))
        if glu is None and str(activation).startswith("gelu"):
            glu = "GeGLU"
        glu = glu or f"{activation}-GLU"
    qk_norm = "none"
    q_norm = [shape for n, shape in layer0.items() if n.endswith("q_norm.weight")]
    if q_norm:
        qk_norm = "per_head" if q_norm[0] and q_norm[0][0] == head_dim else "full"

    embed = [v for k, v in shapes.items() if k.endswith("embed_tokens.weight")]
    vocab_rows = int(embed[0][0]) if embed else int(c.get("vocab_size") or 0)
    if shapes:
        tied = not any(k.endswith("lm_head.weight") for k in shapes)
    else:
        tied = bool(c.get("tie_word_embeddings", False))
    rope_params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = None
    if isinstance(rope_params, dict):
        rope_type = rope_params.get("rope_type") or rope_params.get("type")
        if rope_type is None and rope_params:  # per-layer-type parameters (Gemma 3)
            inner = next(iter(rope_params.values()))
            if isinstance(inner, dict):
                rope_type = inner.get("rope_type")
    rope = bool(c.get("rope_theta") or rope_params or c.get("rotary_emb_base") or c.get("rope_pct"))
    layer_types = c.get("layer_types")
    known = re.compile(
        r"(self_attn|attention|mlp)\.(q|k|v|o|qkv|gate|up|down|gate_up)_proj\.(weight|bias)$"
        r"|(norm|layernorm)[\w.]*\.weight$|(q|k)_norm\.weight$"
    )
    unknown = sorted(n for n in layer0 if not known.search(n))
    tok_files = [n for n in ("tokenizer.json", "tokenizer.model") if (path / n).exists()]
    return ArchInfo(
        path=str(path),
        architecture=arch,
        model_type=str(c.get("model_type") or cfg.get("model_type") or ""),
        decoder_only=is_causal_lm(cfg),
        attention=attention,
        mlp=mlp,
        activation=str(activation) if activation else None,
        glu=glu,
        qk_norm=qk_norm,
        tied_embeddings=tied,
        sliding_window=int(c["sliding_window"]) if c.get("sliding_window") else None,
        layer_types=list(layer_types) if isinstance(layer_types, list) else None,
        num_layers=int(c.get("num_hidden_layers") or 0),
        hidden_size=hidden,
        intermediate_size=int(c.get("intermediate_size") or 0) or None,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        explicit_head_dim=bool(hd_cfg) and heads > 0 and head_dim * heads != hidden,
        vocab_rows=vocab_rows,
        tokenizer_ids=tokenizer_id_count(path),
        tokenizer_json_entries=_tokenizer_json_entries(path),
        tokenizer_files=tok_files,
        tokenizer_class=_tokenizer_class(path),
        rope=rope,
        rope_type=str(rope_type) if rope_type else None,
        attention_bias=any(n.endswith(("q_proj.bias", "qkv_proj.bias")) for n in names),
        layer_prefix=prefix,
        unknown_layer_tensors=unknown,
        llama_cpp_converter=_known(arch, llama_cpp_architectures),
        onnx_genai_builder=_known(arch, onnx_genai_architectures),
    )


def is_causal_lm(cfg: dict[str, Any]) -> bool:
    """Decoder-only causal LM: a *ForCausalLM (or *LMHeadModel) head, not encoder-decoder."""
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else ""
    if cfg.get("is_encoder_decoder"):
        return False
    return arch.endswith(("ForCausalLM", "LMHeadModel"))


def _known(arch: str, lister: Any) -> bool | None:
    try:
        names: frozenset[str] = lister()
    except (OSError, ImportError, SyntaxError, ValueError):
        return None  # tool not installed: unknown, the pass reports it when it runs
    if not names:
        return None
    return arch in names


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every *.safetensors file (headers only)."""
    shapes: dict[str, list[int]] = {}
    for w in sorted(path.glob("*.safetensors")):
        try:
            with w.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError) as exc:
            raise ModelFormatError(f"unreadable safetensors header: {exc}", where=w) from None
        for k, v in header.items():
            if k != "__metadata__":
                shapes[k] = [int(d) for d in v.get("shape", [])]
    return shapes


def _layer0(shapes: dict[str, list[int]]) -> tuple[dict[str, list[int]], str | None]:
    """Tensors of decoder layer 0 (names relative to the layer) and the layers' prefix."""
    out: dict[str, list[int]] = {}
    prefix = None
    for name, shape in shapes.items():
        m = _LAYER.match(name)
        if m and m.group("index") == "0" and "vision" not in name and "audio" not in name:
            prefix = prefix or m.group("prefix")
            if m.group("prefix") == prefix:
                out[m.group("rest")] = shape
    return out, prefix


def tokenizer_id_count(path: Path) -> int | None:
    """How many token ids the tokenizer can produce (max id + 1), from its files."""
    best = -1
    tj = path / "tokenizer.json"
    if tj.exists():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and vocab:
            best = max(int(v) for v in vocab.values())
        elif isinstance(vocab, list):
            best = len(vocab) - 1
        for tok in data.get("added_tokens") or []:
            best = max(best, int(tok.get("id", -1)))
    at = path / "added_tokens.json"
    if at.exists():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            best = max([best, *(int(v) for v in json.loads(at.read_text()).values())])
    if best < 0 and (path / "tokenizer.model").exists():
        try:
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor()
            sp.LoadFromFile(str(path / "tokenizer.model"))
            best = int(sp.vocab_size()) - 1
        except (ImportError, OSError, RuntimeError):
            return None
    return best + 1 if best >= 0 else None


def _tokenizer_json_entries(path: Path) -> int | None:
    try:
        data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        return len(data["model"]["vocab"]) + len(data.get("added_tokens") or [])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tokenizer_class(path: Path) -> str | None:
    tc = path / "tokenizer_config.json"
    try:
        value = json.loads(tc.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def describe_arch(info: ArchInfo) -> list[tuple[str, str]]:
    """Human-readable (fact, value) rows for `slmops model info`."""
    tok = "?" if info.tokenizer_ids is None else str(info.tokenizer_ids)
    return [
        ("architecture", f"{info.architecture} (model_type {info.model_type})"),
        ("decoder-only causal LM", "yes" if info.decoder_only else "no"),
        ("layers x hidden", f"{info.num_layers} x {info.hidden_size}"),
        (
            "attention",
            f"{info.attention}, {info.num_attention_heads} heads, {info.num_key_value_heads} KV "
            f"heads, head_dim {info.head_dim}{' (explicit)' if info.explicit_head_dim else ''}",
        ),
        ("q/k norm", info.qk_norm),
        ("MLP", f"{info.mlp} ({info.glu or info.activation}), width {info.intermediate_size}"),
        ("RoPE", f"yes ({info.rope_type or 'default'})" if info.rope else "no"),
        ("sliding window", str(info.sliding_window) if info.sliding_window else "no"),
        ("tied embeddings", "yes" if info.tied_embeddings else "no"),
        ("vocabulary", f"{info.vocab_rows} embedding rows, {tok} tokenizer ids"),
        ("llama.cpp converter", _yes_no(info.llama_cpp_converter)),
        ("ONNX GenAI builder", _yes_no(info.onnx_genai_builder)),
    ]


def _yes_no(value: bool | None) -> str:
    return "not installed" if value is None else ("knows it" if value else "does not know it")
