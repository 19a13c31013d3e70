"""Differential-privacy noise has the documented scale, and redaction catches what it should.

Noise is checked statistically with a seeded generator: over many draws the noise on a figure
averages to about 0 and its mean absolute deviation is about the Laplace scale, which must be
sensitivity / (epsilon * share) as the module documents. Redaction is checked per kind, and
against the false positives that would make samples useless (years, versions, prices, dates).
"""

from __future__ import annotations

import random
import statistics

import pytest

from slmops.agent.privacy import (
    EPSILON_SHARES,
    NOISED,
    QUALITY_TOKENS_CAP,
    SENSITIVITY,
    laplace,
    laplace_noise,
    luhn_ok,
    redact,
    scales,
)
from slmops.protocol.telemetry import BOUNDS, ERROR_KINDS, Feedback, Histogram, WindowAggregate

DRAWS = 2000


def busy_window() -> WindowAggregate:
    """Counts far from zero, so clamping at 0 does not bias the noise statistics."""
    return WindowAggregate(
        start=0,
        end=900,
        requests=10_000,
        errors={"timeout": 5_000},
        prompt_tokens=10**7,
        output_tokens=10**7,
        histograms={
            "latency_ms": Histogram(
                counts=[5_000.0] * (len(BOUNDS["latency_ms"]) + 1), sum=1.0, count=60_000
            )
        },
        logprob_mean=-1.2,
        entropy_mean=2.0,
        quality_tokens=80_000,
        peak_rss_bytes=123,
        health_ok=5_000,
        feedback=Feedback(up=5_000, down=5_000),
    )


def test_laplace_sampler_mean_and_mean_absolute_deviation() -> None:
    rng = random.Random(1)
    draws = [laplace(2.0, rng) for _ in range(DRAWS * 5)]
    assert abs(statistics.fmean(draws)) < 0.1
    assert statistics.fmean(abs(x) for x in draws) == pytest.approx(2.0, rel=0.04)


def test_budget_split_is_explicit_and_scales_follow_sensitivity() -> None:
    assert sum(EPSILON_SHARES.values()) == pytest.approx(1.0)
    assert set(EPSILON_SHARES) == set(SENSITIVITY)
    sc = scales(0.5)
    assert sc["requests"] == pytest.approx(1 / (0.5 * EPSILON_SHARES["requests"]))
    assert sc["quality"] == pytest.approx(QUALITY_TOKENS_CAP / (0.5 * EPSILON_SHARES["quality"]))
    assert sc["histograms"] == pytest.approx(4 / (0.5 * EPSILON_SHARES["histograms"]))


@pytest.mark.parametrize(
    ("figure", "group"),
    [
        (lambda w: w.requests, "requests"),
        (lambda w: w.errors["timeout"], "errors"),
        (lambda w: w.histograms["latency_ms"].counts[3], "histograms"),
        (lambda w: w.prompt_tokens, "tokens"),
        (lambda w: w.feedback.down, "feedback"),
        (lambda w: w.health_ok, "health"),
    ],
    ids=["requests", "errors", "histogram bucket", "tokens", "feedback", "health"],
)
def test_noise_on_each_figure_group_has_the_documented_scale(figure, group) -> None:  # type: ignore[no-untyped-def]
    exact, rng, epsilon = busy_window(), random.Random(7), 1.0
    noise = [figure(laplace_noise(exact, epsilon, rng)) - figure(exact) for _ in range(DRAWS)]
    scale = scales(epsilon)[group]
    # rounding to 2 decimals adds at most 0.005 per draw; the tolerances dwarf it
    assert abs(statistics.fmean(noise)) < 0.1 * scale
    assert statistics.fmean(abs(x) for x in noise) == pytest.approx(scale, rel=0.08)


def test_noised_window_names_its_figures_fills_every_bucket_and_drops_means() -> None:
    empty = WindowAggregate(start=0, end=900, peak_rss_bytes=77)
    out = laplace_noise(empty, 2.0, random.Random(3))
    assert out.noised == list(NOISED) and out.epsilon == 2.0
    assert set(out.errors) == set(ERROR_KINDS)  # zero kinds are noised too: the shape leaks nothing
    assert set(out.histograms) == set(BOUNDS)
    for name, hist in out.histograms.items():
        assert len(hist.counts) == len(BOUNDS[name]) + 1
        assert all(c >= 0 for c in hist.counts)  # clamped: consumers read counts
        assert hist.count == pytest.approx(sum(hist.counts), abs=0.05)
    assert out.quality_tokens == out.histograms["logprob"].count
    assert out.requests >= 0 and out.health_failed >= 0 and out.feedback.up >= 0
    assert out.logprob_mean is None and out.entropy_mean is None
    assert out.peak_rss_bytes == 77  # a property of the process, not of users: exact
    busy = laplace_noise(busy_window(), 2.0, random.Random(3))
    assert busy.logprob_mean is None and busy.entropy_mean is None


def test_noise_is_reproducible_with_a_seed_and_refuses_double_spending() -> None:
    a = laplace_noise(busy_window(), 1.0, random.Random(9))
    assert a == laplace_noise(busy_window(), 1.0, random.Random(9))
    with pytest.raises(ValueError, match="already noised"):
        laplace_noise(a, 1.0, random.Random(9))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        laplace_noise(busy_window(), 0.0, random.Random(9))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe+tag@mail.example.co.uk today", "write to [EMAIL] today"),
        ("ping ops@example.com.", "ping [EMAIL]."),
        ("call +44 20 7946 0958 now", "call [PHONE] now"),
        ("call (555) 123-4567", "call [PHONE]"),
        ("call 555-123-4567 or 555.123.4567", "call [PHONE] or [PHONE]"),
        ("appelle le 06 12 34 56 78", "appelle le [PHONE]"),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("amex 378282246310005", "amex [CARD]"),
        ("host 192.168.1.20, gw 10.0.0.1.", "host [IP], gw [IP]."),
        ("v6 2001:db8::8a2e:370:7334 and ::1", "v6 [IP] and [IP]"),
        ("full 2001:0db8:0000:0000:0000:ff00:0042:8329", "full [IP]"),
    ],
)
def test_redaction_of_each_kind(text: str, expected: str) -> None:
    out, n = redact(text)
    assert out == expected
    assert n == expected.count("[")


@pytest.mark.parametrize(
    "text",
    [
        "in 2026 we shipped version 1.2.3 (build 1.2.3.4.5)",
        "it costs $1,299.99 or 1299 EUR, 1,000,000 units",
        "on 2026-11-29 at 12:30:45, ratio 10:30",
        "pi is 3.14159 and e is 2.71828",
        "card 4111 1111 1111 1112 fails Luhn",  # a mistyped card is not redacted
        "order 1234567890123 and id 5551234567",
        "std::vector<int> and a :: b",
        "mac aa:bb:cc:dd:ee:ff and 999.1.1.1",
        "user@localhost has no domain",
    ],
)
def test_no_false_positives(text: str) -> None:
    assert redact(text) == (text, 0)


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")
