"""The outbox keeps telemetry on disk until acknowledged, within the byte budget and buffer cap.

The byte budget is measured on the real thing: a simulated day of one request a minute through
the real Aggregator and Outbox, every batch compressed for real and acknowledged as sent.
Offline buffering, drop accounting, idempotent batch ids across restarts, corrupt files and a
real kill -9 of a writer are exercised on a real directory.
"""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slmops.agent.outbox import Outbox
from slmops.agent.telemetry import Aggregator
from slmops.protocol.telemetry import (
    BOUNDS,
    Histogram,
    Sample,
    TelemetryBatch,
    TelemetryPolicy,
    WindowAggregate,
)

T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC, a multiple of 900


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def window(i: int, requests: int = 3) -> WindowAggregate:
    """A window with a histogram of varied counts, so it does not compress to nothing."""
    rng = random.Random(i)
    counts = [float(rng.randint(0, 500)) for _ in BOUNDS["latency_ms"]] + [0.0]
    return WindowAggregate(
        start=T0 + 900 * i,
        end=T0 + 900 * (i + 1),
        model="m",
        requests=requests,
        histograms={
            "latency_ms": Histogram(counts=counts, sum=rng.uniform(0, 1e6), count=sum(counts))
        },
    )


def decode(data: bytes) -> TelemetryBatch:
    return TelemetryBatch.model_validate_json(gzip.decompress(data))


def simulate_day(epsilon: float | None, tmp: Path) -> tuple[int, int, int]:
    """One request a minute for 24 h, one batch sent per closed window (the worst case for
    bytes: gzip has the least to share). Returns (bytes sent, batches, windows delivered)."""
    policy = TelemetryPolicy(epsilon=epsilon)
    clock, rng = Clock(), random.Random(42)
    agg = Aggregator(policy, clock=clock, rng=random.Random(1))
    box = Outbox(tmp, policy, clock=clock)
    agg.set_model("acme/bot", "1.0.0", "q4_k_m", "rollout-7")
    sent = batches = delivered = 0
    for minute in range(24 * 60 + 1):  # through the end of the last window of the day
        clock.t = T0 + 60 * minute
        if minute < 24 * 60:
            out = rng.randint(5, 300)
            agg.record_request(
                ttft_ms=rng.uniform(20, 400),
                latency_ms=rng.uniform(100, 8000),
                prompt_tokens=rng.randint(10, 800),
                output_tokens=out,
                decode_tps=rng.uniform(5, 60),
                error=None if rng.random() > 0.02 else "timeout",
                logprobs=[-rng.expovariate(1.0) for _ in range(out)],
                entropies=[rng.expovariate(1.0) for _ in range(out)],
            )
            agg.record_health(True)
            agg.record_rss(rng.randint(50_000_000, 90_000_000))
            if rng.random() < 0.05:
                agg.record_feedback(rng.random() < 0.8)
        box.put(agg.close_due())
        batch = box.next_batch()
        if batch is not None:
            batch_id, data = batch
            delivered += len(decode(data).windows)
            sent, batches = sent + len(data), batches + 1
            assert box.ack(batch_id)
    return sent, batches, delivered


@pytest.mark.parametrize("epsilon", [None, 1.0], ids=["exact", "dp"])
def test_a_day_at_one_request_a_minute_fits_the_default_budget(
    epsilon: float | None, tmp_path: Path
) -> None:
    sent, batches, delivered = simulate_day(epsilon, tmp_path)
    print(f"epsilon={epsilon}: {sent} bytes/day in {batches} batches, {delivered} windows")
    assert delivered == 96 and batches == 96
    assert sent <= 100_000


def test_over_budget_batches_wait_for_the_next_utc_day(tmp_path: Path) -> None:
    clock = Clock(T0 + 3600 * 15)  # 23:00 UTC
    box = Outbox(tmp_path, TelemetryPolicy(daily_byte_budget=1000), clock=clock)
    box.put([window(i, requests=i + 1) for i in range(40)])
    first = box.next_batch()
    assert first is not None and len(first[1]) <= 1000
    n_first = len(decode(first[1]).windows)
    assert 1 <= n_first < 40  # built smaller to fit the budget
    assert box.ack(first[0])
    while (b := box.next_batch()) is not None:
        assert box.ack(b[0])
    stats = box.stats()
    assert 0 < stats.bytes_sent_today <= 1000 and stats.buffered_windows > 0
    held = stats.buffered_windows
    clock.t = T0 + 3600 * 16 + 1  # 00:00:01 UTC the next day
    nxt = box.next_batch()
    assert nxt is not None and box.stats().buffered_windows == held
    assert box.ack(nxt[0]) and box.stats().buffered_windows < held
    assert box.stats().bytes_sent_today == len(nxt[1])


def test_an_item_larger_than_a_whole_day_is_dropped_and_counted(tmp_path: Path) -> None:
    policy = TelemetryPolicy(daily_byte_budget=1000, samples=True)
    box = Outbox(tmp_path, policy, clock=Clock())
    noise = random.Random(0)
    text = "".join(chr(noise.randint(0x4E00, 0x9FFF)) for _ in range(4000))  # incompressible
    box.put([window(0)], [Sample(at=T0, prompt=text, response=text)])
    batch = box.next_batch()
    assert batch is not None
    got = decode(batch[1])
    assert len(got.windows) == 1 and got.samples == []  # windows first, the sample waits
    assert box.ack(batch[0])
    last = box.next_batch()
    assert last is not None  # the sample alone cannot fit any day: dropped, and reported
    assert decode(last[1]).dropped_reason == "samples too_large=1"
    assert box.stats().buffered_samples == 0


def test_offline_windows_buffer_up_to_the_cap_and_drops_are_reported(tmp_path: Path) -> None:
    clock = Clock()
    policy = TelemetryPolicy(buffer_max_windows=10)
    box = Outbox(tmp_path, policy, clock=clock, max_windows_per_batch=5)
    box.put([window(i) for i in range(5)])
    in_flight = box.next_batch()  # built, but the link is down: never acknowledged
    assert in_flight is not None
    box.put([window(i) for i in range(5, 25)])
    stats = box.stats()
    assert (stats.buffered_windows, stats.dropped_windows, stats.dropped) == (
        10,
        15,
        {"buffer_full": 15},
    )
    assert box.next_batch() == in_flight  # same id, same bytes: the batch in flight is kept
    assert decode(in_flight[1]).dropped_windows == 0
    assert box.ack(in_flight[0])
    report = box.next_batch()
    assert report is not None
    got = decode(report[1])
    assert (got.dropped_windows, got.dropped_reason) == (15, "buffer_full=15")
    assert [w.start for w in got.windows] == [window(i).start for i in range(20, 25)]  # newest kept
    box.put([window(30)])
    for _ in range(8):
        box.put([window(40 + _)])  # more drops while the report is in flight
    assert box.ack(report[0])
    # the ack forgets the 15 drops the report carried, not the 4 made while it was in flight
    assert box.stats().dropped == {"buffer_full": 4}
    nxt = box.next_batch()
    assert nxt is not None and decode(nxt[1]).dropped_windows == 4


def test_batch_ids_are_stable_until_acked_also_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    box = Outbox(tmp_path, TelemetryPolicy(), clock=clock)
    assert box.next_batch() is None  # nothing to send
    box.put([window(0), window(1)])
    first = box.next_batch()
    assert first is not None and box.next_batch() == first
    restarted = Outbox(tmp_path, TelemetryPolicy(), clock=clock)
    assert restarted.next_batch() == first
    got = decode(first[1])
    assert got.batch_id == first[0] and [w.start for w in got.windows] == [T0, T0 + 900]
    assert restarted.ack("not-this-one") is False
    assert restarted.ack(first[0]) is True
    assert restarted.ack(first[0]) is False  # acknowledging twice changes nothing
    assert restarted.next_batch() is None and restarted.stats().buffered_windows == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_corrupt_file_is_skipped_counted_and_reported(tmp_path: Path) -> None:
    box = Outbox(tmp_path, TelemetryPolicy(), clock=Clock())
    box.put([window(0), window(1)])
    good = (tmp_path / "w-000000000002.json").read_bytes()
    (tmp_path / "w-000000000002.json").write_bytes(good[: len(good) // 2])  # torn write
    (tmp_path / ".slmops-tmp-abc").write_bytes(b"half")  # a killed atomic write
    box = Outbox(tmp_path, TelemetryPolicy(), clock=Clock())
    assert not (tmp_path / ".slmops-tmp-abc").exists()
    batch = box.next_batch()
    assert batch is not None
    got = decode(batch[1])
    assert [w.start for w in got.windows] == [T0]
    assert (got.dropped_windows, got.dropped_reason) == (1, "corrupt=1")
    assert box.stats().corrupt_files == 1


def test_samples_are_deleted_when_the_opt_in_is_revoked(tmp_path: Path) -> None:
    box = Outbox(tmp_path, TelemetryPolicy(samples=True), clock=Clock())
    box.put([window(0)], [Sample(at=T0, prompt="p", response="r")])
    batch = box.next_batch()
    assert batch is not None and len(decode(batch[1]).samples) == 1
    box.set_policy(TelemetryPolicy(samples=False))
    again = box.next_batch()
    assert again is not None and again[0] != batch[0]  # rebuilt without the text
    assert decode(again[1]).samples == [] and box.stats().buffered_samples == 0
    box.set_policy(TelemetryPolicy(enabled=False))
    assert box.next_batch() is None and box.stats().buffered_windows == 0


WRITER = """
import sys
from pathlib import Path
from slmops.agent.outbox import Outbox
from slmops.protocol.telemetry import TelemetryPolicy, WindowAggregate
box = Outbox(Path(sys.argv[1]), TelemetryPolicy(buffer_max_windows=50))
i = 0
while True:
    box.put([WindowAggregate(start=i, end=i + 1, requests=1)])
    i += 1
    if i == 5:
        print("ready", flush=True)
    if i % 7 == 0:
        b = box.next_batch()
        if b is not None and i % 2 == 0:
            box.ack(b[0])
"""


def test_survives_kill_9_mid_write(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    box = Outbox(tmp_path, TelemetryPolicy(buffer_max_windows=50))
    stats = box.stats()
    assert stats.corrupt_files == 0 and 0 < stats.buffered_windows <= 50
    total = 0
    while (batch := box.next_batch()) is not None:
        got = decode(batch[1])
        total += len(got.windows)
        assert box.ack(batch[0])
    assert total == stats.buffered_windows and box.stats().corrupt_files == 0
