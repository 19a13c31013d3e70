"""The fast GGUF reader's string arrays read exactly what the stock gguf reader reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

from slmops.model.gguf_info import gguf_reader, string_array


def _write(path: Path, tokens: list[str]) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(len(tokens))])
    w.add_tensor("t", np.zeros((4,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_long_string_array_matches_the_stock_reader(tmp_path: Path) -> None:
    # long enough for the fast path, with multi-byte and empty pieces
    tokens = [f"▁tok{i}" if i % 7 else f"ü{i}\u2581é" for i in range(5000)] + ["", "  "]
    path = tmp_path / "vocab.gguf"
    _write(path, tokens)
    fast = gguf_reader(path)
    assert not fast.get_field("tokenizer.ggml.tokens").data  # skipped while opening
    got = string_array(fast, "tokenizer.ggml.tokens")
    assert got == GGUFReader(path).fields["tokenizer.ggml.tokens"].contents() == tokens
    assert string_array(fast, "tokenizer.ggml.scores") is None  # not a string array
    assert string_array(fast, "no.such.key") is None
