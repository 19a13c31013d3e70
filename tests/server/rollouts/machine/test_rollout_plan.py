"""Wave sizes and device order: exact, monotone, deterministic, spread over hardware classes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmops.server.rollouts.machine import RolloutPolicy, WaveStep, pick_order, wave_targets

DEFAULT = RolloutPolicy().waves


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (0, [0, 0, 0, 0]),
        (1, [1, 1, 1, 1]),  # the canary is the only device: later waves add nothing
        (7, [1, 1, 4, 7]),  # 1% and 10% of 7 both round up to one device
        (100, [1, 10, 50, 100]),
        (1000, [10, 100, 500, 1000]),
    ],
)
def test_default_plan(total: int, expected: list[int]) -> None:
    assert wave_targets(DEFAULT, total) == expected


def test_counts_and_percentages_mix_and_never_shrink() -> None:
    waves = [WaveStep(count=5), WaveStep(percent=1), WaveStep(count=20), WaveStep(percent=100)]
    assert wave_targets(waves, 100) == [5, 5, 20, 100]  # 1% (1 device) adds nothing after 5
    assert wave_targets(waves, 3) == [3, 3, 3, 3]  # counts are capped at the fleet
    assert wave_targets(waves, 1000) == [5, 10, 20, 1000]


def test_percentages_use_exact_decimals() -> None:
    # 0.1 * 100 / 100 in floats is just above 10 % of 100; ceil must still say 10
    assert wave_targets([WaveStep(percent=10), WaveStep(percent=100)], 100) == [10, 100]
    assert wave_targets([WaveStep(percent=33.3), WaveStep(percent=100)], 1000) == [333, 1000]
    assert wave_targets([WaveStep(percent=0.1), WaveStep(percent=100)], 10) == [1, 10]


def test_negative_total_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="total must be >= 0"):
        wave_targets(DEFAULT, -1)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(st.floats(0.01, 99.99), max_size=4, unique=True),
    st.lists(st.integers(1, 500), max_size=3, unique=True),
    st.integers(0, 5000),
    st.integers(0, 50),
)
def test_targets_are_monotone_and_end_at_everyone(
    percents: list[float], counts: list[int], total: int, more: int
) -> None:
    waves = [WaveStep(count=c) for c in sorted(counts)]
    waves += [WaveStep(percent=p) for p in sorted(percents)] + [WaveStep(percent=100)]
    targets = wave_targets(waves, total)
    assert targets == sorted(targets)
    assert targets[-1] == total
    assert all(0 <= t <= total for t in targets)
    if total:
        assert targets[0] >= 1
    grown = wave_targets(waves, total + more)  # late devices never shrink any wave's target
    assert all(a <= b for a, b in zip(targets, grown, strict=True))


def test_pick_order_is_deterministic_and_seeded() -> None:
    devices = {f"d{i}": "pi5" for i in range(50)}
    assert pick_order("r1", devices) == pick_order("r1", dict(reversed(devices.items())))
    assert pick_order("r1", devices) != pick_order("r2", devices)
    assert sorted(pick_order("r1", devices)) == sorted(devices)


def test_pick_order_interleaves_hardware_classes() -> None:
    devices = {f"pi-{i}": "pi5" for i in range(90)}
    devices |= {f"jet-{i}": "jetson" for i in range(8)}
    devices |= {"lap-0": "laptop"}
    first = pick_order("seed", devices)[:3]
    assert {devices[d] for d in first} == {"pi5", "jetson", "laptop"}


@settings(max_examples=100, deadline=None, database=None)
@given(st.dictionaries(st.text(min_size=1, max_size=6), st.sampled_from("abc"), max_size=30))
def test_pick_order_is_a_permutation_with_classes_round_robin(devices: dict[str, str]) -> None:
    order = pick_order("s", devices)
    assert sorted(order) == sorted(devices)
    seen: dict[str, int] = {}
    rounds = []
    for d in order:
        rounds.append(seen.get(devices[d], 0))
        seen[devices[d]] = seen.get(devices[d], 0) + 1
    assert rounds == sorted(rounds)  # every class's n-th device before any (n+1)-th
