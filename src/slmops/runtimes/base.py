"""The runtime interface: load with threads and context, tokenize, score, generate (streaming).

Token ids are the currency: quality metrics feed the same ids to every runtime, so tokenizer
differences (BOS handling in ONNX GenAI, for one) cannot masquerade as model differences.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from slmops.core.errors import ModelFormatError

if TYPE_CHECKING:
    import numpy as np


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token's time is TTFT; decode speed counts the tokens after it
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Runtime(ABC):
    """A loaded model. Subclasses set `name` and implement the abstract methods."""

    name: ClassVar[str]
    format: ClassVar[str]

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        self.path = path
        self.threads = threads
        self.n_ctx = n_ctx
        t0 = time.perf_counter()
        self._load()
        self.load_time_s = time.perf_counter() - t0

    @abstractmethod
    def _load(self) -> None: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_ids(self) -> set[int]: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `ids` (fresh context): float32 [len(ids), vocab]."""

    @abstractmethod
    def stream(
        self, ids: Sequence[int], max_tokens: int, temperature: float = 0.0
    ) -> Iterator[int]:
        """Yield generated token ids one by one (greedy when temperature is 0); stops at EOS."""

    def generate(
        self,
        ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        stop_at_eos: bool = True,
    ) -> tuple[list[int], GenerationStats]:
        """Generate and time it: TTFT includes prompt processing, decode covers the rest."""
        out: list[int] = []
        t0 = time.perf_counter()
        t_first = t0
        for tok in self.stream(ids, max_tokens, temperature):
            if not out:
                t_first = time.perf_counter()
            if stop_at_eos and tok in self.eos_ids:
                break
            out.append(tok)
        t_end = time.perf_counter()
        return out, GenerationStats(len(ids), len(out), t_first - t0, t_end - t_first)

    @property
    def chat_template(self) -> str | None:
        """The model's chat template (Jinja), if its files carry one."""
        from slmops.runtimes.chat import template_from_folder

        return template_from_folder(self.path) if self.path.is_dir() else None

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered with the model's template (BOS first when it has one)."""
        from slmops.runtimes.chat import render_chat

        text = render_chat(messages, self.chat_template)
        bos = [self.bos_id] if self.bos_id is not None else []
        return bos + self.tokenize(text)

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release native memory early (otherwise at garbage collection)."""


def runtime_for(path: Path) -> type[Runtime]:
    from slmops.model.handle import ModelFormat, detect_format

    fmt = detect_format(path)
    if fmt is ModelFormat.GGUF:
        from slmops.runtimes.llama_cpp import LlamaCppRuntime

        return LlamaCppRuntime
    if fmt is ModelFormat.ONNX:
        from slmops.runtimes.onnx_genai import OnnxGenAIRuntime

        return OnnxGenAIRuntime
    if fmt is ModelFormat.HF:
        from slmops.runtimes.transformers_ref import TransformersRuntime

        return TransformersRuntime
    raise ModelFormatError(f"no runtime for format {fmt}", where=path)  # pragma: no cover


def open_runtime(path: str | Path, *, threads: int = 2, n_ctx: int = 512) -> Runtime:
    p = Path(path)
    return runtime_for(p)(p, threads, n_ctx)
