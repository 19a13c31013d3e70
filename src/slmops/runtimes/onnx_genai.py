"""ONNX Runtime GenAI: the folder written by export-onnx, run with its own generator loop."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from slmops.core.errors import ModelFormatError
from slmops.runtimes.base import Runtime, TokenStats

if TYPE_CHECKING:
    import numpy as np


class OnnxGenAIRuntime(Runtime):
    name = "onnxruntime-genai"
    format = "onnx-genai"

    def _load(self) -> None:
        import onnxruntime_genai as og

        self._og: Any = og
        try:
            cfg = og.Config(str(self.path))
            cfg.clear_providers()  # CPU
            # the thread count given to the seam, as llama.cpp gets it (the default follows cores)
            cfg.overlay(
                json.dumps(
                    {
                        "model": {
                            "decoder": {"session_options": {"intra_op_num_threads": self.threads}}
                        }
                    }
                )
            )
            self._model: Any = og.Model(cfg)
        except Exception as exc:  # the binding raises plain RuntimeError/OrtException types
            raise ModelFormatError(
                f"ONNX Runtime GenAI cannot load the model: {exc}", where=self.path
            ) from None
        self._tok: Any = og.Tokenizer(self._model)
        genai = json.loads((self.path / "genai_config.json").read_text())
        model_cfg = genai.get("model", {})
        self._vocab = int(model_cfg.get("vocab_size", 0))
        self._bos = model_cfg.get("bos_token_id")
        eos = model_cfg.get("eos_token_id", [])
        self._eos = {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        self._ctx_max = int(model_cfg.get("context_length", self.n_ctx))
        # Sliding-window models (Gemma 2/3) keep a windowed KV cache that ORT refuses to size
        # below the window: every generator gets at least that much room.
        window = (model_cfg.get("decoder") or {}).get("sliding_window") or {}
        self._min_length = int(window.get("window_size", 0)) if isinstance(window, dict) else 0
        opts = (
            genai.setdefault("model", {})
            .setdefault("decoder", {})
            .setdefault("session_options", {})
        )
        self._threads_set = opts.get("intra_op_num_threads")

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def bos_id(self) -> int | None:
        return int(self._bos) if self._bos is not None else None

    @property
    def eos_ids(self) -> set[int]:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        ids = [int(t) for t in self._tok.encode(text)]
        # the GenAI tokenizer may or may not prepend BOS depending on the export; normalise
        if ids and self.bos_id is not None and ids[0] == self.bos_id:
            ids = ids[1:]
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids)))

    def _generator(self, max_length: int, temperature: float) -> Any:
        max_length = min(self._ctx_max, max(max_length, self._min_length))
        params = self._og.GeneratorParams(self._model)
        if temperature > 0:
            params.set_search_options(
                max_length=max_length, do_sample=True, temperature=temperature, top_k=40
            )
        else:
            params.set_search_options(max_length=max_length, do_sample=False)
        return self._og.Generator(self._model, params)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        gen = self._generator(min(self._ctx_max, max(len(ids) + 1, 2)), 0.0)
        gen.append_tokens(list(ids))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        return np.array(out.reshape(-1, out.shape[-1])[-len(ids) :], copy=True)

    def stream(
        self,
        ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        *,
        stats: TokenStats | None = None,
    ) -> Iterator[int]:
        gen = self._generator(min(self._ctx_max, len(ids) + max_tokens), temperature)
        gen.append_tokens(list(ids))
        n = 0
        while not gen.is_done() and n < max_tokens:
            # generate_next_token samples from the current logits and then already runs the
            # model on the new token, so the logits a token is drawn from are read *before* it
            # (after append_tokens for the first token, after the previous step for the rest).
            if stats is None:
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
            else:
                logits = gen.get_logits()
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                stats.add(logits, tok)
            yield tok
            n += 1
