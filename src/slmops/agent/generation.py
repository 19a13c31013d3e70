"""What the agent's API generates: request schemas, sampling settings, the token loop.

Split from openai_api.py (HTTP) so each stays small; ``_generate`` is the one place that turns
a runtime's token stream into text deltas with stop strings and a finish reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmops.agent.http_guard import ApiError
from slmops.protocol.device import GenerationDefaults
from slmops.runtimes.base import Runtime, TokenStats


@dataclass
class Served:
    runtime: Runtime
    model_id: str
    defaults: GenerationDefaults


@dataclass
class Timing:
    """When a generation started and produced its first and last token."""

    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0


class _Lenient(BaseModel):
    # OpenAI clients send fields we do not use (user, seed, logprobs...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class _Sampling(_Lenient):
    model: str
    max_tokens: int | None = Field(None, gt=0, le=8192)
    max_completion_tokens: int | None = Field(None, gt=0, le=8192)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _generate(
    served: Served,
    ids: list[int],
    req: _Sampling,
    counted: list[int] | None = None,
    *,
    stats: TokenStats | None = None,
    timing: Timing | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Yield (text delta, finish reason or None); stops at EOS, a stop string or max tokens.
    ``counted[0]`` is kept at the number of tokens generated (EOS not counted); ``stats`` gets
    each token's log-prob and entropy (only asked for when telemetry wants them), ``timing``
    the first and last token times."""
    d = served.defaults
    max_tokens = req.max_completion_tokens or req.max_tokens or d.max_tokens
    temperature = d.temperature if req.temperature is None else req.temperature
    stops = _stops(req.stop)
    rt = served.runtime
    out: list[int] = []
    text = ""
    # Incremental detokenization (as transformers' TextStreamer does): decode only a short window
    # since the last clean boundary, so each token costs O(1) instead of re-decoding everything.
    prefix = read = 0
    stream = (
        rt.stream(ids, max_tokens, temperature)
        if stats is None
        else rt.stream(ids, max_tokens, temperature, stats=stats)
    )
    for tok in stream:
        if timing is not None:
            timing.end = time.perf_counter()
            if timing.first is None:
                timing.first = timing.end
        if tok in rt.eos_ids:
            if stats is not None:
                stats.truncate(len(out))  # EOS is not output
            yield "", "stop"
            return
        out.append(tok)
        if timing is not None:
            timing.tokens = len(out)
        if counted is not None:
            counted[0] = len(out)
        window = rt.detokenize(out[prefix:])
        if window.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        delta = window[len(rt.detokenize(out[prefix:read])) if read > prefix else 0 :]
        prefix, read = read, len(out)
        if stops:
            cut = min((i for st in stops if (i := (text + delta).find(st)) >= 0), default=-1)
            if cut >= 0:
                yield (text + delta)[len(text) : cut], "stop"
                return
        text += delta
        yield delta, None
    yield "", "length"


def _parse(cls: type[_Sampling], body: Any) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(
            400, f"{param}: {err['msg']}" if param else err["msg"], param=param
        ) from None
