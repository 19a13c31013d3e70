"""llama.cpp through llama-cpp-python: GGUF models, CPU threads, all-position logits for scoring.

All-position logits (llama-cpp-python's logits_all) are switched on only when a caller scores
text (`logits`): with them every prompt token also runs the output layer and copies a vocabulary
row, which on a 262k-vocabulary model (Gemma 3) costs about as much as the rest of the network
per prompt token and 1 MiB of RAM per token of context. Serving and speed runs never need them:
the per-token statistics read the last row straight from the context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.core.errors import ModelFormatError
from slmops.runtimes.base import Runtime, TokenStats
from slmops.runtimes.llama_log import install_llama_log, take_errors

if TYPE_CHECKING:
    import numpy as np


class LlamaCppRuntime(Runtime):
    """`lora_path`: a GGUF LoRA adapter applied on top at load (llama.cpp's `lora_path`), as
    the agent runs a site's adapter over the shared base."""

    name = "llama.cpp"
    format = "gguf"

    _logits_all = False

    def __init__(
        self, path: Path, threads: int, n_ctx: int, *, lora_path: Path | None = None
    ) -> None:
        self.lora_path = lora_path
        super().__init__(path, threads, n_ctx)

    def _load(self) -> None:
        import llama_cpp

        files = sorted(self.path.glob("*.gguf")) if self.path.is_dir() else [self.path]
        if not files:
            raise ModelFormatError("no .gguf file", where=self.path)
        install_llama_log()  # errors only on stderr unless SLMOPS_LLAMA_LOG=1 (llama_log.py)
        take_errors()  # forget earlier loads' errors: a failure below quotes only its own
        try:
            self._llm: Any = llama_cpp.Llama(
                model_path=str(files[0]),
                n_ctx=self.n_ctx,
                n_batch=min(512, self.n_ctx),
                n_threads=self.threads,
                n_threads_batch=self.threads,
                logits_all=self._logits_all,
                lora_path=str(self.lora_path) if self.lora_path else None,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            what = (
                f"the model with adapter {self.lora_path.name}" if self.lora_path else "the model"
            )
            said = "; ".join(take_errors()[-3:])
            raise ModelFormatError(
                f"llama.cpp cannot load {what}: {exc}" + (f" (llama.cpp: {said})" if said else ""),
                where=self.lora_path or files[0],
            ) from None
        self._scoring = False

    @property
    def chat_template(self) -> str | None:
        value = self._llm.metadata.get("tokenizer.chat_template")
        return str(value) if value else None

    @property
    def vocab_size(self) -> int:
        return int(self._llm.n_vocab())

    @property
    def bos_id(self) -> int | None:
        b = int(self._llm.token_bos())
        return b if b >= 0 else None

    @property
    def eos_ids(self) -> set[int]:
        return {int(self._llm.token_eos())}

    def tokenize(self, text: str) -> list[int]:
        return [
            int(t) for t in self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        ]

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(self._llm.detokenize(list(ids))).decode("utf-8", errors="replace")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        if not self._logits_all:  # first scoring call: reload once with all-position logits
            self._llm.close()
            self._logits_all = True
            self._load()
        self._llm.reset()
        self._llm.eval(list(ids))
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def stream(
        self,
        ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        *,
        stats: TokenStats | None = None,
    ) -> Iterator[int]:
        llm = self._llm
        llm.reset()
        top_k = 1 if temperature == 0 else 40
        gen = llm.generate(list(ids), temp=temperature, top_k=top_k, reset=True)
        for n, tok in enumerate(gen, 1):
            if stats is not None:
                # when a token is yielded it is not evaluated yet, so the row it was sampled
                # from is the last evaluated one
                stats.add(self._last_row(), int(tok))
            yield int(tok)
            if n >= max_tokens or len(ids) + n >= self.n_ctx:
                return

    def _last_row(self) -> np.ndarray:
        """Logits of the last evaluated position, without all-position logits."""
        import numpy as np

        llm = self._llm
        if self._logits_all:
            return np.asarray(llm.scores[llm.n_tokens - 1])
        ptr = llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
