"""The Aggregator turns requests into per-window aggregates, driven by an injected clock.

Windows are aligned to the grid of ``window_seconds``, a model change closes a window early, empty
windows are not emitted (except under DP, where skipping them would leak), histograms use the
shared BOUNDS, quality means are over tokens, RSS is a per-window peak, samples are opt-in,
redacted and capped per day, and concurrent recording from threads loses nothing.
"""

from __future__ import annotations

import itertools
import random
import threading

import pytest

import slmops.agent.telemetry as telemetry
from slmops.agent.privacy import NOISED, OUTPUT_TOKENS_CAP, PROMPT_TOKENS_CAP, QUALITY_TOKENS_CAP
from slmops.agent.telemetry import Aggregator
from slmops.protocol.telemetry import BOUNDS, TelemetryPolicy, WindowAggregate

T0 = 1_800_000_000.0  # a multiple of 900: the start of a 15-minute window


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def request(agg: Aggregator, **kw: object) -> None:
    args: dict[str, object] = {
        "ttft_ms": 30.0, "latency_ms": 400.0, "prompt_tokens": 10, "output_tokens": 20,
        "decode_tps": 40.0,
    }  # fmt: skip
    args.update(kw)
    agg.record_request(**args)  # type: ignore[arg-type]


def make(**policy: object) -> tuple[Aggregator, Clock]:
    clock = Clock()
    agg = Aggregator(TelemetryPolicy.model_validate(policy), clock=clock, rng=random.Random(0))
    agg.set_model("acme/bot", "1.0.0", "q4", "r1")
    return agg, clock


def test_windows_are_aligned_and_close_when_their_end_passes() -> None:
    agg, clock = make()
    clock.t = T0 + 10
    request(agg)
    clock.t = T0 + 899
    request(agg)
    assert agg.close_due(T0 + 899.9) == []
    (w,) = agg.close_due(T0 + 900)
    assert (w.start, w.end, w.requests, w.model, w.version) == (
        T0,
        T0 + 900,
        2,
        "acme/bot",
        "1.0.0",
    )
    assert (w.variant, w.rollout_id, w.noised, w.epsilon) == ("q4", "r1", [], None)
    # an event after a gap lands in its own aligned window; the idle windows between are skipped
    clock.t = T0 + 3 * 900 + 5
    request(agg)
    assert agg.close_due(T0 + 4 * 900 - 1) == []
    assert agg.close_due() == []  # clock.t is still inside the window
    clock.t = T0 + 4 * 900
    (w2,) = agg.close_due()
    assert (w2.start, w2.end, w2.requests) == (T0 + 2700, T0 + 3600, 1)


def test_an_event_after_the_window_end_closes_it_without_close_due() -> None:
    agg, clock = make(window_seconds=60)
    request(agg)
    clock.t = T0 + 61
    request(agg)
    first, second = agg.close_due(T0 + 120)
    assert (first.start, first.end, second.start, second.end) == (T0, T0 + 60, T0 + 60, T0 + 120)


def test_model_switch_closes_the_window_early_so_no_window_mixes_models() -> None:
    agg, clock = make()
    clock.t = T0 + 100
    request(agg)
    clock.t = T0 + 300
    agg.set_model("acme/bot", "1.0.0", "q4", "r1")  # same model: no split
    clock.t = T0 + 350
    agg.set_model("acme/bot", "1.1.0", "q4", "r2")
    clock.t = T0 + 400
    request(agg, error="timeout")
    a, b = agg.close_due(T0 + 900)
    assert (a.start, a.end, a.version, a.requests) == (T0, T0 + 350, "1.0.0", 1)
    assert (b.start, b.end, b.version, b.rollout_id, b.requests) == (
        T0 + 350,
        T0 + 900,
        "1.1.0",
        "r2",
        1,
    )
    # a model set on a window with nothing recorded relabels it instead of splitting
    clock.t = T0 + 1000
    agg.record_rss(5)
    agg.set_model("acme/bot", "2.0.0")
    request(agg)
    (c,) = agg.close_due(T0 + 1800)
    assert (c.start, c.version, c.variant) == (T0 + 900, "2.0.0", None)


def test_histograms_use_the_shared_bounds_and_errors_their_kinds() -> None:
    agg, _ = make()
    request(agg, ttft_ms=5, latency_ms=10_000, decode_tps=1e9, output_tokens=0)  # on bounds / past
    request(agg, ttft_ms=5.001, latency_ms=0.5, output_tokens=1024, decode_tps=float("nan"))
    request(agg, latency_ms=30, error="timeout")
    request(agg, latency_ms=31, error="cosmic-ray")
    (w,) = agg.close_due(T0 + 900)
    h = w.histograms
    assert h["ttft_ms"].counts == [1, 1] + [0] * (len(BOUNDS["ttft_ms"]) - 1)
    assert h["ttft_ms"].count == 2 and h["ttft_ms"].sum == pytest.approx(10.001)
    assert h["latency_ms"].counts[0] == 1 and h["latency_ms"].counts[2] == 2
    assert h["latency_ms"].counts[BOUNDS["latency_ms"].index(10_000)] == 1
    assert h["latency_ms"].count == 4  # errored requests count in latency
    assert h["decode_tps"].counts[-1] == 1 and h["decode_tps"].count == 1  # NaN skipped
    assert h["output_tokens"].counts[0] == 1 and h["output_tokens"].counts[-2] == 1
    assert w.errors == {"timeout": 1, "other": 1}
    assert (w.requests, w.prompt_tokens, w.output_tokens) == (4, 40, 20 + 20 + 1024)
    assert all(len(x.counts) == len(BOUNDS[n]) + 1 for n, x in h.items())
    assert "logprob" not in h and w.logprob_mean is None and w.quality_tokens == 0


def test_quality_proxies_are_means_over_tokens_and_a_logprob_histogram() -> None:
    agg, _ = make()
    request(agg, logprobs=[-0.05, -1.0, -9.0], entropies=[0.5, 1.5, 1.0])
    request(agg, logprobs=[-0.3], entropies=[2.0])
    (w,) = agg.close_due(T0 + 900)
    assert w.logprob_mean == pytest.approx((-0.05 - 1.0 - 9.0 - 0.3) / 4)
    assert w.entropy_mean == pytest.approx(5.0 / 4)
    assert w.quality_tokens == 4
    counts = w.histograms["logprob"].counts
    assert counts[0] == 1  # -9 <= -8
    assert counts[BOUNDS["logprob"].index(-1)] == 1  # -1.0 sits on its bound
    assert counts[BOUNDS["logprob"].index(-0.25)] == 1  # -0.3 in (-0.5, -0.25]
    assert counts[-1] == 1  # -0.05 above the last bound


def test_peak_rss_health_and_feedback() -> None:
    agg, _ = make()
    for rss in (10, 30, 20):
        agg.record_rss(rss)
    assert agg.close_due(T0 + 900) == []  # a gauge alone is not activity
    agg2, _ = make()
    for rss in (10, 30, 20):
        agg2.record_rss(rss)
    agg2.record_health(True)
    agg2.record_health(True)
    agg2.record_health(False)
    agg2.record_feedback(True)
    agg2.record_feedback(False)
    agg2.record_feedback(True)
    (w,) = agg2.close_due(T0 + 900)
    assert (w.peak_rss_bytes, w.health_ok, w.health_failed) == (30, 2, 1)
    assert (w.feedback.up, w.feedback.down, w.requests) == (2, 1, 0)


def test_policy_changes_close_the_window_and_disable_stops_collection() -> None:
    agg, clock = make()
    request(agg)
    clock.t = T0 + 120
    agg.set_policy(TelemetryPolicy(window_seconds=60))
    request(agg)
    a, b = agg.close_due(T0 + 180)
    assert (a.end, b.start, b.end) == (T0 + 120, T0 + 120, T0 + 180)
    agg.set_policy(TelemetryPolicy(enabled=False))
    request(agg)
    agg.record_health(True)
    assert agg.close_due(T0 + 10_000) == []
    assert agg.offer_sample("hi", "there") is False


def test_samples_are_opt_in_redacted_and_capped_per_utc_day() -> None:
    agg, clock = make()
    assert agg.offer_sample("mail me: a@b.example", "ok") is False
    agg.set_policy(TelemetryPolicy(samples=True, max_samples_per_day=2))
    assert agg.offer_sample("mail me: a@b.example", "call +1 555 123 4567") is True
    assert agg.offer_sample("x" * 5000, "y") is True
    assert agg.offer_sample("third", "one") is False  # today's cap
    first, second = agg.take_samples()
    assert (first.prompt, first.response, first.redactions) == (
        "mail me: [EMAIL]",
        "call [PHONE]",
        2,
    )
    assert len(second.prompt) == 4000 and first.at == T0
    assert agg.take_samples() == []
    clock.t = T0 + 86_400
    assert agg.offer_sample("next", "day") is True
    agg.set_policy(TelemetryPolicy(samples=False))  # revoking discards what was not taken
    assert agg.take_samples() == []


def test_dp_windows_are_noised_emitted_on_schedule_and_capped_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agg, clock = make(epsilon=1.0, window_seconds=60)
    clock.t = T0 + 30
    request(agg)
    windows = agg.close_due(T0 + 180)  # one busy window, then two empty ones: all emitted
    assert [w.start for w in windows] == [T0, T0 + 60, T0 + 120]
    for w in windows:
        assert w.epsilon == 1.0 and w.noised == list(NOISED) and w.logprob_mean is None
        assert set(w.histograms) == set(BOUNDS)
    # the exact window behind the noise honours the per-request caps the sensitivity assumes
    seen: list[WindowAggregate] = []

    def spy(window: WindowAggregate, epsilon: float, rng: random.Random) -> WindowAggregate:
        seen.append(window)
        return window

    monkeypatch.setattr(telemetry, "laplace_noise", spy)
    clock.t = T0 + 200
    request(agg, prompt_tokens=10**6, output_tokens=10**6, logprobs=[-1.0] * 1000)
    agg.close_due(T0 + 240)
    exact = seen[-1]
    assert (exact.prompt_tokens, exact.output_tokens) == (PROMPT_TOKENS_CAP, OUTPUT_TOKENS_CAP)
    assert exact.histograms["logprob"].count == QUALITY_TOKENS_CAP


def test_concurrent_recording_loses_nothing() -> None:
    agg, clock = make(window_seconds=10)
    stop = threading.Event()
    closed: list[WindowAggregate] = []

    def work() -> None:
        for i in range(250):
            request(agg, logprobs=[-0.5, -1.5])
            if i % 50 == 0:
                clock.t += 1  # windows roll while threads record
            agg.record_health(True)

    def closer() -> None:
        while not stop.is_set():
            closed.extend(agg.close_due())

    threads = [threading.Thread(target=work) for _ in range(8)]
    reaper = threading.Thread(target=closer)
    reaper.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    reaper.join()
    closed.extend(agg.close_due(clock.t + 3600))
    assert sum(w.requests for w in closed) == 2000
    assert sum(w.health_ok for w in closed) == 2000
    assert sum(w.quality_tokens for w in closed) == 4000
    ends = [(w.start, w.end) for w in closed]
    assert ends == sorted(ends) and all(a[1] <= b[0] for a, b in itertools.pairwise(ends))


def test_switching_to_dp_starts_the_fixed_schedule_at_once() -> None:
    agg, clock = make(window_seconds=60)
    clock.t = T0 + 30
    request(agg)
    agg.set_policy(TelemetryPolicy(window_seconds=60, epsilon=2.0))
    exact, *noised = agg.close_due(T0 + 120)  # no event since the switch: still emitted
    assert (exact.end, exact.epsilon, exact.requests) == (T0 + 30, None, 1)
    assert [(w.start, w.end, w.epsilon) for w in noised] == [
        (T0 + 30, T0 + 60, 2.0),
        (T0 + 60, T0 + 120, 2.0),
    ]
