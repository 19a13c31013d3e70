"""The runtime interface: load with threads and context, tokenize, score, generate (streaming).

Token ids are the currency: quality metrics feed the same ids to every runtime, so tokenizer
differences (BOS handling in ONNX GenAI, for one) cannot masquerade as model differences.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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


@dataclass
class TokenStats:
    """Per-token quality proxies collected while streaming (opt in: ``stream(..., stats=s)``).

    For every token a runtime yields, it first appends to ``logprobs`` the token's natural-log
    probability and to ``entropies`` the entropy (nats) of the next-token distribution it was
    drawn from. Both are taken from the *raw* model distribution, softmax(logits) over the whole
    model vocabulary, before temperature, top-k or any other sampling transform, so figures from
    devices serving at different temperatures stay comparable. ``logprobs[-1]`` inside the loop
    body belongs to the token just yielded; an EOS token gets an entry too (callers that do not
    count EOS as output drop it, as `Runtime.generate` does).
    """

    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Tokens recorded (an empty TokenStats is not falsy: test `is None`)."""
        return len(self.logprobs)

    def add(self, logits: np.ndarray, token: int) -> None:
        """Record `token` drawn from next-token `logits` (one row, any float dtype)."""
        logprob, entropy = token_stats(logits, token)
        self.logprobs.append(logprob)
        self.entropies.append(entropy)

    def truncate(self, n: int) -> None:
        """Keep the first `n` tokens' figures (drop a trailing EOS, say)."""
        del self.logprobs[n:], self.entropies[n:]

    @property
    def logprob_mean(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None

    @property
    def entropy_mean(self) -> float | None:
        return sum(self.entropies) / len(self.entropies) if self.entropies else None


def token_stats(logits: np.ndarray, token: int) -> tuple[float, float]:
    """(log p(token), entropy in nats) of softmax(`logits`), in one pass over the vocabulary.

    With z = logits - max and Z = sum(exp z): log p(t) = z[t] - log Z and
    H = log Z - sum(exp(z) z) / Z. Clipped to log p <= 0 and H >= 0 (float rounding).
    """
    import numpy as np

    z = np.asarray(logits, dtype=np.float32).reshape(-1)
    z = z - z.max()
    e = np.exp(z)
    total = float(e.sum())
    log_total = math.log(total)
    logprob = float(z[token]) - log_total
    entropy = log_total - float(np.dot(e, z)) / total
    return min(logprob, 0.0), max(entropy, 0.0)


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
        self,
        ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        *,
        stats: TokenStats | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one by one (greedy when temperature is 0); stops at EOS.

        With `stats`, each token's log-probability and the entropy of its next-token
        distribution (raw model distribution, see `TokenStats`) are appended to it before the
        token is yielded. Without it, nothing extra is computed.
        """

    def generate(
        self,
        ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        stop_at_eos: bool = True,
        *,
        stats: TokenStats | None = None,
    ) -> tuple[list[int], GenerationStats]:
        """Generate and time it: TTFT includes prompt processing, decode covers the rest.

        `stats`, if given, ends with one entry per returned token (a stopping EOS dropped).
        """
        out: list[int] = []
        n_before = stats.count if stats is not None else 0
        t0 = time.perf_counter()
        t_first = t0
        tokens = (
            self.stream(ids, max_tokens, temperature)
            if stats is None  # the default call exactly as before (subclasses without `stats`)
            else self.stream(ids, max_tokens, temperature, stats=stats)
        )
        for tok in tokens:
            if not out:
                t_first = time.perf_counter()
            if stop_at_eos and tok in self.eos_ids:
                break
            out.append(tok)
        t_end = time.perf_counter()
        if stats is not None:
            stats.truncate(n_before + len(out))
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
