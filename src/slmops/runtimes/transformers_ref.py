"""transformers on CPU in float32: the reference every variant is compared against."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from slmops.runtimes.base import Runtime, TokenStats

if TYPE_CHECKING:
    import numpy as np


class TransformersRuntime(Runtime):
    name = "transformers"
    format = "hf"

    def _load(self) -> None:
        import torch
        from transformers import AutoTokenizer

        from slmops.model.hf import load_causal_lm

        torch.set_num_threads(self.threads)
        self._torch: Any = torch
        self._model: Any = load_causal_lm(self.path)
        self._tok: Any = AutoTokenizer.from_pretrained(self.path)
        self._tok.model_max_length = 1 << 30

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.vocab_size)

    @property
    def bos_id(self) -> int | None:
        b = self._tok.bos_token_id
        return int(b) if b is not None else None

    @property
    def eos_ids(self) -> set[int]:
        eos = self._model.config.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list) else [eos])}

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._tok(text, add_special_tokens=False)["input_ids"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids)))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self._model(torch.tensor([list(ids)]))
        return out.logits[0].float().numpy().copy()  # type: ignore[no-any-return]

    def stream(
        self,
        ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        *,
        stats: TokenStats | None = None,
    ) -> Iterator[int]:
        torch = self._torch
        past = None
        inp = torch.tensor([list(ids)])
        with torch.no_grad():
            for _ in range(max_tokens):
                out = self._model(inp, cache=past, use_cache=True, logits_to_keep=1)
                past = getattr(out, "cache", None) or out.past_key_values
                logits = out.logits[0, -1]
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    tok = int(torch.multinomial(probs, 1))
                else:
                    tok = int(torch.argmax(logits))
                if stats is not None:
                    stats.add(logits.float().numpy(), tok)
                yield tok
                inp = torch.tensor([[tok]])
