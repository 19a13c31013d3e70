"""Telemetry aggregation on the device: requests in, per-window aggregates out, no raw text.

The OpenAI API records every request here (from its worker threads, hence one lock); the
daemon calls ``close_due`` on its loop and hands the closed windows to the outbox. Windows are
aligned to multiples of ``window_seconds`` since the epoch, so windows of different devices
line up and the server can add them bucket by bucket. A window never mixes two models, two LoRA
adapters or two policies: ``set_model`` with another model or adapter, and a ``set_policy`` that
changes the window length or the budget, close the current window early (its ``end`` is the
moment of the change).

Without DP, windows with no activity (no request, health probe or feedback) are not emitted,
to save bytes on idle devices; a peak RSS reading alone is a gauge, not activity. With
``epsilon`` set, every window is emitted on a fixed schedule from the moment a model is set,
empty or not, and noised by ``privacy.laplace_noise``: skipping empty windows would reveal
whether anything happened. Under DP the Aggregator also enforces the per-request caps that
the noise's sensitivity assumes (token counts clipped, at most ``QUALITY_TOKENS_CAP``
evenly spaced per-token log-probs per request).

Samples (opt-in only) are redacted here, before they are stored anywhere, and capped per UTC
day; the cap keeps the first ones of the day (simple and predictable for the operator).
"""

from __future__ import annotations

import math
import random
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from slmops.agent.privacy import (
    OUTPUT_TOKENS_CAP,
    PROMPT_TOKENS_CAP,
    QUALITY_TOKENS_CAP,
    laplace_noise,
    redact,
)
from slmops.protocol.telemetry import (
    BOUNDS,
    ERROR_KINDS,
    Feedback,
    Histogram,
    Sample,
    TelemetryPolicy,
    WindowAggregate,
)

SAMPLE_MAX_CHARS = 4000  # Sample.prompt/response max_length


@dataclass(frozen=True)
class ModelIdentity:
    name: str | None = None
    version: str | None = None
    variant: str | None = None
    rollout_id: str | None = None
    adapter: str | None = None  # "name:version" of the LoRA adapter served over the model


@dataclass
class _Hist:
    counts: list[int]
    sum: float = 0.0
    count: int = 0

    def add(self, name: str, value: float) -> None:
        # bisect_left: bucket i holds values <= bounds[i]; past the last bound, the last bucket
        self.counts[bisect_left(BOUNDS[name], value)] += 1
        self.sum += value
        self.count += 1


@dataclass
class _Window:
    """The mutable accumulator of the open window."""

    start: float
    end: float
    model: ModelIdentity
    epsilon: float | None
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    hists: dict[str, _Hist] = field(default_factory=dict)
    lp_sum: float = 0.0
    lp_n: int = 0
    ent_sum: float = 0.0
    ent_n: int = 0
    peak_rss: int = 0
    health_ok: int = 0
    health_failed: int = 0
    up: int = 0
    down: int = 0

    @property
    def active(self) -> bool:
        return bool(self.requests or self.health_ok or self.health_failed or self.up or self.down)

    def observe(self, name: str, value: float) -> None:
        if not math.isfinite(value):
            return
        hist = self.hists.get(name)
        if hist is None:
            hist = self.hists[name] = _Hist([0] * (len(BOUNDS[name]) + 1))
        hist.add(name, value)

    def aggregate(self) -> WindowAggregate:
        """The exact figures of this window (noise, if any, is added by the caller)."""
        return WindowAggregate(
            start=self.start,
            end=self.end,
            model=self.model.name,
            version=self.model.version,
            variant=self.model.variant,
            rollout_id=self.model.rollout_id,
            adapter=self.model.adapter,
            requests=self.requests,
            errors={k: float(v) for k, v in self.errors.items() if v},
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            histograms={
                name: Histogram(
                    counts=[float(c) for c in h.counts], sum=round(h.sum, 3), count=h.count
                )
                for name, h in self.hists.items()
            },  # rounding: 17 digits of float noise would cost bytes and mean nothing
            logprob_mean=round(self.lp_sum / self.lp_n, 5) if self.lp_n else None,
            entropy_mean=round(self.ent_sum / self.ent_n, 5) if self.ent_n else None,
            quality_tokens=max(self.lp_n, self.ent_n),
            peak_rss_bytes=self.peak_rss,
            health_ok=self.health_ok,
            health_failed=self.health_failed,
            feedback=Feedback(up=self.up, down=self.down),
        )


def _spread(values: Sequence[float], cap: int | None) -> Sequence[float]:
    """At most ``cap`` values, evenly spaced over the sequence (not just its head)."""
    n = len(values)
    if cap is None or n <= cap:
        return values
    return [values[i * n // cap] for i in range(cap)]


def utc_day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).date().isoformat()


class Aggregator:
    """Thread-safe per-window aggregation of one device's serving (see the module docstring).

    ``clock`` is injectable so tests (and the simulator) can drive windows without waiting;
    ``rng`` draws the DP noise and defaults to the OS's CSPRNG.
    """

    def __init__(
        self,
        policy: TelemetryPolicy,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._rng = rng if rng is not None else random.SystemRandom()
        self._lock = threading.Lock()
        self._model = ModelIdentity()
        self._current: _Window | None = None
        self._last_end = -math.inf
        self._closed: list[WindowAggregate] = []
        self._samples: list[Sample] = []
        self._sample_day = ""
        self._samples_today = 0

    # -- windows ------------------------------------------------------------------------------

    def _finish(self, win: _Window) -> None:
        self._last_end = max(self._last_end, win.end)
        if win.epsilon is not None:
            self._closed.append(laplace_noise(win.aggregate(), win.epsilon, self._rng))
        elif win.active:
            self._closed.append(win.aggregate())

    def _advance(self, t: float) -> None:
        """Close every window whose end has passed; under DP, keep the schedule going."""
        ws = self._policy.window_seconds
        while self._current is not None and t >= self._current.end:
            done = self._current
            self._finish(done)
            if done.epsilon is None:
                self._current = None
            else:
                start = done.end
                if (t - start) / ws > self._policy.buffer_max_windows:
                    # after a long sleep, skip to the window holding t: the outbox could not
                    # keep more anyway, and the skip depends on time only, not on data
                    start = math.floor(t / ws) * ws
                self._current = _Window(start, start + ws, self._model, done.epsilon)

    def _open(self, t: float) -> _Window | None:
        """The window receiving an event at time ``t`` (None while telemetry is disabled)."""
        if not self._policy.enabled:
            return None
        self._advance(t)
        if self._current is None:
            # aligned to the window grid, but never overlapping a window already closed (one
            # closed early, or a clock that stepped back)
            ws = self._policy.window_seconds
            start = max(math.floor(t / ws) * ws, self._last_end)
            end = (math.floor(start / ws) + 1) * ws
            self._current = _Window(start, end, self._model, self._policy.epsilon)
        return self._current

    def _close_early(self, t: float) -> None:
        """End the open window now (a model or policy change), so no window mixes two."""
        self._advance(t)
        win = self._current
        if win is None:
            return
        win.end = max(t, math.nextafter(win.start, math.inf))
        self._finish(win)
        self._current = None

    def set_model(
        self,
        name: str | None,
        version: str | None,
        variant: str | None = None,
        rollout_id: str | None = None,
        *,
        adapter: str | None = None,
    ) -> None:
        """Make later events count for this model and adapter (``name:version``, None: the
        model alone); closes the open window if either changes, so the server can tell an
        adapter's figures from the base model's."""
        identity = ModelIdentity(name, version, variant, rollout_id, adapter)
        with self._lock:
            t = self._clock()
            if identity != self._model:
                win = self._current
                if win is not None and win.epsilon is None and not win.active:
                    win.model = identity  # nothing recorded yet: relabel instead of splitting
                else:
                    self._close_early(t)
                self._model = identity
            if self._policy.enabled and self._policy.epsilon is not None:
                self._open(t)  # under DP the fixed schedule starts when a model is set

    def set_policy(self, policy: TelemetryPolicy) -> None:
        """Apply a new policy. Disabling drops what was not yet closed; a new window length or
        budget closes the open window first; revoking samples discards the pending ones."""
        with self._lock:
            t = self._clock()
            old, self._policy = self._policy, policy
            if not policy.enabled:
                self._current = None
                self._closed.clear()
                self._samples.clear()
                return
            if (old.window_seconds, old.epsilon) != (policy.window_seconds, policy.epsilon):
                self._policy = old
                self._close_early(t)
                self._policy = policy
                if policy.epsilon is not None and self._model != ModelIdentity():
                    self._open(t)  # a model is serving: the DP schedule starts now
            if not policy.samples:
                self._samples.clear()

    def wants_quality(self) -> bool:
        """Whether per-token log-probs are worth computing (they cost a softmax per token)."""
        return self._policy.enabled

    def close_due(self, now: float | None = None) -> list[WindowAggregate]:
        """Windows whose end has passed (and those closed early), oldest first, then forgotten."""
        with self._lock:
            self._advance(self._clock() if now is None else now)
            out, self._closed = self._closed, []
            return out

    # -- events -------------------------------------------------------------------------------

    def record_request(
        self,
        *,
        ttft_ms: float,
        latency_ms: float,
        prompt_tokens: int,
        output_tokens: int,
        decode_tps: float,
        error: str | None = None,
        logprobs: Sequence[float] | None = None,
        entropies: Sequence[float] | None = None,
    ) -> None:
        """Count one request. An errored request counts in ``requests``, its error kind (an
        unknown kind becomes "other"), tokens and latency, but not in ttft/decode/output
        histograms, whose values are meaningless for a request that failed."""
        with self._lock:
            win = self._open(self._clock())
            if win is None:
                return
            dp = win.epsilon is not None
            if dp:
                prompt_tokens = min(max(prompt_tokens, 0), PROMPT_TOKENS_CAP)
                output_tokens = min(max(output_tokens, 0), OUTPUT_TOKENS_CAP)
            win.requests += 1
            win.prompt_tokens += prompt_tokens
            win.output_tokens += output_tokens
            win.observe("latency_ms", latency_ms)
            if error is not None:
                kind = error if error in ERROR_KINDS else "other"
                win.errors[kind] = win.errors.get(kind, 0) + 1
            else:
                win.observe("ttft_ms", ttft_ms)
                win.observe("decode_tps", decode_tps)
                win.observe("output_tokens", output_tokens)
            cap = QUALITY_TOKENS_CAP if dp else None
            for lp in _spread(logprobs or (), cap):
                if math.isfinite(lp):
                    win.observe("logprob", lp)
                    win.lp_sum += lp
                    win.lp_n += 1
            for h in _spread(entropies or (), cap):
                if math.isfinite(h):
                    win.ent_sum += h
                    win.ent_n += 1

    def record_health(self, ok: bool) -> None:
        with self._lock:
            win = self._open(self._clock())
            if win is not None:
                if ok:
                    win.health_ok += 1
                else:
                    win.health_failed += 1

    def record_feedback(self, up: bool) -> None:
        with self._lock:
            win = self._open(self._clock())
            if win is not None:
                if up:
                    win.up += 1
                else:
                    win.down += 1

    def record_rss(self, rss_bytes: int) -> None:
        """Keep the window's peak resident memory (a gauge: it does not make a window active)."""
        with self._lock:
            win = self._open(self._clock())
            if win is not None:
                win.peak_rss = max(win.peak_rss, int(rss_bytes))

    # -- samples ------------------------------------------------------------------------------

    def offer_sample(self, prompt: str, response: str) -> bool:
        """Keep a redacted prompt/response pair if the policy opts in and today's cap allows;
        returns whether it was kept. Text is redacted before it is stored anywhere."""
        with self._lock:
            policy = self._policy
            if not (policy.enabled and policy.samples):
                return False
            now = self._clock()
            day = utc_day(now)
            if day != self._sample_day:
                self._sample_day, self._samples_today = day, 0
            if self._samples_today >= policy.max_samples_per_day:
                return False
            self._samples_today += 1
        p, n_p = redact(prompt)
        r, n_r = redact(response)
        sample = Sample(
            at=now, prompt=p[:SAMPLE_MAX_CHARS], response=r[:SAMPLE_MAX_CHARS],
            redactions=n_p + n_r,
        )  # fmt: skip
        with self._lock:
            if not (self._policy.enabled and self._policy.samples):
                return False  # the opt-in was revoked while we were redacting
            self._samples.append(sample)
        return True

    def take_samples(self) -> list[Sample]:
        with self._lock:
            out, self._samples = self._samples, []
            return out
