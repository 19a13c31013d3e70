"""What passes need from a model's structure, as reusable checks over an `ArchInfo`.

Each function returns the missing pieces as short sentences (empty list = the model has what the
pass needs). The engine collects them for every step of a recipe before running anything, so a
user learns in one message every variant that cannot be built and why.
"""

from __future__ import annotations

from slmops.model.arch import GGUF_ATTENTION_IS_HIDDEN_WIDE, GGUF_NEEDS_SENTENCEPIECE, ArchInfo


def causal_lm(arch: ArchInfo) -> list[str]:
    if not arch.decoder_only:
        return [f"{arch.architecture or 'this model'} is not a decoder-only causal LM"]
    return []


def decoder_blocks(arch: ArchInfo) -> list[str]:
    """Decoder layers with projections the pruning code knows (q/k/v/o or qkv, gated MLP)."""
    missing = causal_lm(arch)
    if arch.layer_prefix is None:
        missing.append("no decoder layers found in the weights (tensors named *.layers.N.*)")
        return missing
    if arch.attention == "other":
        missing.append("attention projections q_proj/k_proj/v_proj/o_proj (or fused qkv_proj)")
    missing += gated_mlp(arch)
    if arch.unknown_layer_tensors:
        shown = ", ".join(arch.unknown_layer_tensors[:4])
        missing.append(f"decoder layers hold tensors the pruning code does not know ({shown})")
    return missing


def gated_mlp(arch: ArchInfo) -> list[str]:
    if arch.mlp in ("gated", "fused_gate_up"):
        return []
    found = "a non-gated MLP (up/down only)" if arch.mlp == "non_gated" else "another MLP layout"
    return [f"a gated MLP (gate_proj/up_proj/down_proj or fused gate_up_proj); found {found}"]


def kv_groups(arch: ArchInfo) -> list[str]:
    missing = []
    if arch.num_key_value_heads < 2:
        missing.append(f"at least 2 KV head groups to remove one (has {arch.num_key_value_heads})")
    elif arch.num_attention_heads % arch.num_key_value_heads:
        missing.append(
            f"query heads ({arch.num_attention_heads}) divisible by KV heads "
            f"({arch.num_key_value_heads})"
        )
    return missing


def tokenizer_fits(arch: ArchInfo) -> list[str]:
    """llama.cpp's converter asserts (bare AssertionError) when ids exceed embedding rows."""
    if arch.tokenizer_ids is not None and arch.tokenizer_ids > arch.vocab_rows:
        return [
            f"tokenizer ids ({arch.tokenizer_ids}) <= embedding rows ({arch.vocab_rows}); "
            "the tokenizer has more tokens than the model can embed"
        ]
    return []


def llama_cpp_vocab(arch: ArchInfo) -> list[str]:
    """Tokenizer files the converter's set_vocab for this architecture reads."""
    has_sp = "tokenizer.model" in arch.tokenizer_files
    if arch.architecture in GGUF_NEEDS_SENTENCEPIECE and not has_sp:
        return [
            "a SentencePiece tokenizer.model (llama.cpp reads this architecture's vocab from it)"
        ]
    if (
        arch.architecture == "Phi3ForCausalLM"
        and arch.tokenizer_class != "GPT2Tokenizer"
        and not has_sp
    ):
        return [
            "a SentencePiece tokenizer.model (llama.cpp's Phi-3 converter needs it unless "
            "tokenizer_config.json declares GPT2Tokenizer, as Phi-4-mini does)"
        ]
    if (
        arch.architecture == "Gemma3ForCausalLM"
        and not has_sp
        and arch.tokenizer_json_entries not in (None, arch.vocab_rows)
    ):
        return [
            "a SentencePiece tokenizer.model, or a tokenizer.json whose vocab + added tokens "
            f"({arch.tokenizer_json_entries}) equal the embedding rows ({arch.vocab_rows}): "
            "llama.cpp's Gemma 3 converter trims the embedding to tokenizer.json's size but "
            "writes one token per row, and the resulting GGUF does not load"
        ]
    if not arch.tokenizer_files:
        return ["a tokenizer (tokenizer.json or tokenizer.model)"]
    return []


def converter_knows(arch: ArchInfo, known: bool | None, tool: str) -> list[str]:
    if known is False:
        return [f"{tool} support for {arch.architecture or 'this architecture'}"]
    return []


def nm_widths(arch: ArchInfo, m: int) -> list[str]:
    """N:M groups run along every projection's input: hidden, attention and FFN widths."""
    widths = {
        "hidden_size": arch.hidden_size,
        "attention width (heads x head_dim)": arch.num_attention_heads * arch.head_dim,
        "intermediate_size": arch.intermediate_size or 0,
    }
    bad = [f"{k} {v}" for k, v in widths.items() if v % m]
    if bad:
        return [f"projection input widths divisible by m={m} ({', '.join(bad)} are not)"]
    return []


def llama_cpp_attention_width(arch: ArchInfo) -> list[str]:
    """Some llama.cpp loaders assume the attention is exactly hidden_size wide."""
    width = arch.num_attention_heads * arch.head_dim
    if arch.architecture in GGUF_ATTENTION_IS_HIDDEN_WIDE and width != arch.hidden_size:
        return [
            f"heads x head_dim ({arch.num_attention_heads} x {arch.head_dim} = {width}) equal "
            f"to hidden_size ({arch.hidden_size}): llama.cpp's loader for this architecture "
            "assumes it (removing KV groups breaks it; keep the heads or export to ONNX)"
        ]
    return []
