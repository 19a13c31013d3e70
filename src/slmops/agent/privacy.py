"""Privacy on the device: Laplace noise on a window's counts, and redaction of samples.

Differential privacy (``laplace_noise``)
----------------------------------------
Protected unit (what "neighbouring windows" differ by): **one request**, with everything it
adds to a window, or **one health probe**. A request adds 1 to ``requests``, at most 1 to one
error kind, at most ``PROMPT_TOKENS_CAP`` prompt and ``OUTPUT_TOKENS_CAP`` output tokens, one
entry to each of the four request histograms (ttft, latency, decode_tps, output_tokens), at
most ``QUALITY_TOKENS_CAP`` per-token entries to the ``logprob`` histogram, and (if the user
votes) one feedback vote. The caps hold because the Aggregator enforces them while a window is
recorded under a policy with ``epsilon`` (it clips token counts and keeps an evenly spaced
subset of the per-token log-probs); this module only adds the noise those caps make sufficient.

The budget ``epsilon`` is split explicitly across figure groups (``EPSILON_SHARES``, summing
to 1). Each group is a vector with L1 sensitivity ``SENSITIVITY[group]`` under the unit above,
and gets i.i.d. Laplace noise of scale ``sensitivity / (epsilon * share)`` on every
coordinate, which makes that group ``epsilon * share``-DP. By sequential composition the
window as a whole is ``epsilon``-DP (conservatively: a health probe touches only the health
group, so it even costs less). This is *event-level* privacy: a user who sends k requests in
one window is protected at ``k * epsilon`` (group privacy).

Everything that could reveal activity is noised even when it is zero: every error kind,
every bucket of every histogram, so the *shape* of the JSON does not leak (the Aggregator also
emits empty windows on a fixed schedule under DP, because skipping them would leak whether
anything happened). After noise, counts are clamped to >= 0 and rounded to 2 decimals; both are
post-processing (no privacy cost) but clamping biases counts near zero upwards, so consumers
should read small counts as "about zero" and clamp derived rates (errors/requests) to [0, 1].

Derived figures (post-processing of noised ones, no extra budget): a histogram's ``count`` is
the sum of its noised buckets and its ``sum`` is a coarse estimate from bucket representative
values (so a mean read from it is approximate); ``quality_tokens`` is the sum of the noised
``logprob`` buckets. The token-level means ``logprob_mean`` and ``entropy_mean`` are **dropped**
(set to None) under DP: a mean over unbounded per-request token sums would need so much noise
to be useless; the noised ``logprob`` histogram carries the quality signal instead.
``peak_rss_bytes`` is left exact: it is dominated by the model's weights, but a very long
prompt can raise it (KV cache), so strictly it sits outside the guarantee; the schema has no
way to omit it (an ``int``, default 0), a protocol change could make it optional.

Noise is drawn as the difference of two exponentials from the ``random.Random`` given (the
Aggregator defaults to ``random.SystemRandom``: a seeded Mersenne Twister would let anyone who
knows the seed subtract the noise). Floating-point Laplace sampling has known, small leaks
(Mironov 2012); the rounding to 2 decimals mitigates but does not formally remove them.

Redaction (``redact``)
----------------------
Samples leave a device only if the blueprint opts in, and always after ``redact``: e-mail
addresses, phone numbers (international ``+CC ...``, North-American ``(555) 123-4567`` /
``555-123-4567``, and grouped national ``06 12 34 56 78``), payment card numbers (13-19 digits,
optionally grouped by spaces or dashes, kept unless the Luhn check passes, so an order number
is not destroyed), IPv4 and IPv6 addresses (validated with ``ipaddress``). Plain numbers, years,
dates, versions such as ``1.2.3`` and prices are left alone on purpose: over-redaction makes
samples useless for debugging, and they are rarely personal data.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable

from slmops.protocol.telemetry import BOUNDS, ERROR_KINDS, Feedback, Histogram, WindowAggregate

# Per-request caps the Aggregator applies while recording under DP (the sensitivities below
# are only valid with them).
PROMPT_TOKENS_CAP = 2048
OUTPUT_TOKENS_CAP = 1024
QUALITY_TOKENS_CAP = 8

REQUEST_HISTOGRAMS = ("ttft_ms", "latency_ms", "decode_tps", "output_tokens")
QUALITY_HISTOGRAM = "logprob"

EPSILON_SHARES: dict[str, float] = {
    "requests": 0.2,
    "errors": 0.15,
    "histograms": 0.2,
    "quality": 0.1,
    "tokens": 0.1,
    "feedback": 0.1,
    "health": 0.15,
}
SENSITIVITY: dict[str, float] = {
    "requests": 1,
    "errors": 1,  # a request has at most one error kind
    "histograms": len(REQUEST_HISTOGRAMS),  # one bucket in each request histogram
    "quality": QUALITY_TOKENS_CAP,  # per-token log-probs kept per request
    "tokens": PROMPT_TOKENS_CAP + OUTPUT_TOKENS_CAP,
    "feedback": 1,
    "health": 1,
}
NOISED = (
    "requests",
    "errors",
    *(f"histograms.{name}" for name in BOUNDS),
    "quality_tokens",
    "prompt_tokens",
    "output_tokens",
    "feedback",
    "health_ok",
    "health_failed",
)


def laplace(scale: float, rng: random.Random) -> float:
    """One Laplace(0, scale) draw: the difference of two Exp(1/scale) draws (never log(0))."""
    return rng.expovariate(1.0 / scale) - rng.expovariate(1.0 / scale)


def scales(epsilon: float) -> dict[str, float]:
    """The Laplace scale of each figure group for a window budget ``epsilon``."""
    return {g: SENSITIVITY[g] / (epsilon * share) for g, share in EPSILON_SHARES.items()}


def _representative(name: str, bucket: int) -> float:
    """A value standing for a whole bucket, to estimate a histogram's sum after noise."""
    bounds = BOUNDS[name]
    if bucket == 0:
        return bounds[0] / 2 if bounds[0] > 0 else bounds[0]
    if bucket == len(bounds):
        return bounds[-1]
    return (bounds[bucket - 1] + bounds[bucket]) / 2


def laplace_noise(window: WindowAggregate, epsilon: float, rng: random.Random) -> WindowAggregate:
    """A copy of ``window`` with every count figure noised for an ``epsilon``-DP release.

    See the module docstring for the accounting. The input must be an exact window recorded
    under the same ``epsilon`` (so the per-request caps were applied); noising twice would
    spend the budget twice, so an already-noised window is refused.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 for Laplace noise, got {epsilon}")
    if window.noised or window.epsilon is not None:
        raise ValueError(
            f"window starting at {window.start} is already noised (epsilon={window.epsilon}); "
            "noise the exact window once"
        )
    sc = scales(epsilon)

    def noisy(value: float, group: str) -> float:
        return round(max(0.0, value + laplace(sc[group], rng)), 2)

    histograms: dict[str, Histogram] = {}
    for name, bounds in BOUNDS.items():
        group = "quality" if name == QUALITY_HISTOGRAM else "histograms"
        exact = window.histograms.get(name)
        counts = exact.counts if exact is not None else [0.0] * (len(bounds) + 1)
        noised = [noisy(c, group) for c in counts]
        estimate = sum(c * _representative(name, i) for i, c in enumerate(noised))
        histograms[name] = Histogram(
            counts=noised, sum=round(estimate, 2), count=round(sum(noised), 2)
        )
    return window.model_copy(
        update={
            "requests": noisy(window.requests, "requests"),
            "errors": {k: noisy(window.errors.get(k, 0.0), "errors") for k in ERROR_KINDS},
            "prompt_tokens": noisy(window.prompt_tokens, "tokens"),
            "output_tokens": noisy(window.output_tokens, "tokens"),
            "histograms": histograms,
            "logprob_mean": None,
            "entropy_mean": None,
            "quality_tokens": histograms[QUALITY_HISTOGRAM].count,
            "health_ok": noisy(window.health_ok, "health"),
            "health_failed": noisy(window.health_failed, "health"),
            "feedback": Feedback(
                up=noisy(window.feedback.up, "feedback"),
                down=noisy(window.feedback.down, "feedback"),
            ),
            "noised": list(NOISED),
            "epsilon": epsilon,
        }
    )


# ---------------------------------------------------------------------------------------------
# Redaction

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_CARD = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w]|[.,]\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:)?(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # international: +44 20 7946 0958, +1-555-...
    r"|(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # (555) 123-4567, 555.123.4567
    r"|0\d(?:[ .-]\d{2}){4}"  # grouped national: 06 12 34 56 78
    r")(?![\w]|[.,-]\d)"
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (random digit runs fail 9 in 10)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str | None:
    digits = re.sub(r"[ -]", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _ipv6(match: re.Match[str]) -> str | None:
    text = match.group()
    if not any(c.isalnum() for c in text):  # "::" alone is punctuation far more often than IP
        return None
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return "[IP]"


def _ipv4(match: re.Match[str]) -> str | None:
    try:
        ipaddress.IPv4Address(match.group())
    except ValueError:
        return None
    return "[IP]"


def _phone(match: re.Match[str]) -> str | None:
    digits = sum(c.isdigit() for c in match.group())
    return "[PHONE]" if 7 <= digits <= 15 else None


_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str | None]], ...] = (
    (_EMAIL, lambda m: "[EMAIL]"),
    (_CARD, _card),
    (_IPV6, _ipv6),
    (_IPV4, _ipv4),
    (_PHONE, _phone),
)


def redact(text: str) -> tuple[str, int]:
    """``text`` with personal identifiers replaced by ``[EMAIL]``, ``[PHONE]``, ``[CARD]`` and
    ``[IP]``, and how many spans were replaced. Order matters: e-mails first (their digits
    are not phones), cards before phones (a card is a longer digit run)."""
    count = 0
    for pattern, replace in _RULES:

        def sub(
            match: re.Match[str], replace: Callable[[re.Match[str]], str | None] = replace
        ) -> str:
            nonlocal count
            token = replace(match)
            if token is None:
                return match.group()
            count += 1
            return token

        text = pattern.sub(sub, text)
    return text, count
