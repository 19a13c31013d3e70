"""Rebuild a SentencePiece `tokenizer.model` from a GGUF's vocabulary.

Why: transformers dequantizes a GGUF into an HF folder with a `tokenizer.json` only. When that
folder is exported to GGUF again (requantization ladders, pruned variants), llama.cpp's
converter takes a model without `tokenizer.model` down its GPT-2 BPE path, and the new file
tokenizes text differently from the downloaded one (measured on Gemma 3: byte-level BPE rules
over a SentencePiece vocabulary). Writing the SentencePiece model back, from the GGUF's own
tokens, scores and token types, sends the converter down its SentencePiece path, so every
variant tokenizes exactly as the file the user started from.

Only GGUF files whose tokenizer model is "llama" (SentencePiece) need this; others (gpt2 BPE)
round-trip through tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmops.core.atomic import write_bytes_atomic, write_text_atomic
from slmops.core.errors import ModelFormatError
from slmops.model.gguf_info import gguf_reader, string_array

# GGUF token types and SentencePiece piece types share numbering (NORMAL=1 ... BYTE=6).
_VALID_TYPES = {1, 2, 3, 4, 5, 6}


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def sentencepiece_from_gguf(gguf_path: Path, out: Path) -> bool:
    """Write OUT (tokenizer.model) when the GGUF carries a SentencePiece vocabulary.

    Returns False (and writes nothing) for other tokenizer models.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    sp: Any = sp_pb2  # generated protobuf code: no type information

    reader = gguf_reader(gguf_path)
    if _field(reader, "tokenizer.ggml.model") != "llama":
        return False
    tokens = string_array(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if (
        not tokens
        or scores is None
        or types is None
        or not len(tokens) == len(scores) == len(types)
    ):
        raise ModelFormatError(
            "the GGUF's SentencePiece vocabulary is incomplete (tokens, scores and token types "
            "must have one entry per token)",
            where=gguf_path,
        )
    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = any(int(t) == 6 for t in types)
    for key, attr in (
        ("tokenizer.ggml.unknown_token_id", "unk_id"),
        ("tokenizer.ggml.bos_token_id", "bos_id"),
        ("tokenizer.ggml.eos_token_id", "eos_id"),
        ("tokenizer.ggml.padding_token_id", "pad_id"),
    ):
        value = _field(reader, key)
        setattr(proto.trainer_spec, attr, int(value) if value is not None else -1)
    add_prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(add_prefix) if add_prefix is not None else True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        k = int(kind)
        entry = proto.pieces.add()
        entry.piece = str(piece)
        entry.score = float(score)
        entry.type = k if k in _VALID_TYPES else sp.ModelProto.SentencePiece.NORMAL
    write_bytes_atomic(out, proto.SerializeToString())
    # llama.cpp's converter takes user-defined pieces (Gemma's whitespace runs, image markers)
    # from tokenizer_config.json's added_tokens_decoder, not from the SentencePiece model:
    # without them it would split "  " into single spaces where the downloaded file has one
    # token. transformers reads the same entries and maps them to their existing ids.
    # transformers takes added_tokens_decoder as the whole list of added tokens once it is
    # present, so control tokens (<start_of_turn>, ...) go in too, as special.
    added = {
        i: (str(t), int(k) == 3)
        for i, (t, k) in enumerate(zip(tokens, types, strict=True))
        if int(k) in (3, 4)
    }
    cfg_path = out.parent / "tokenizer_config.json"
    if any(not special for _, special in added.values()) and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        decoder = cfg.setdefault("added_tokens_decoder", {})
        for i, (text, special) in added.items():
            decoder.setdefault(
                str(i),
                {
                    # the vocabulary spells spaces as U+2581; llama.cpp's converter turns them
                    # back into spaces for user-defined tokens
                    "content": text if special else text.replace(" ", "\u2581"),
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": special,
                },
            )
        write_text_atomic(cfg_path, json.dumps(cfg, ensure_ascii=False, indent=2))
    return True
