"""Device cost per million tokens, checked against a hand computation."""

from __future__ import annotations

import pytest

from factories.reports import make_report
from slmops.evaluate.cost import DEFAULT_CLOUD_USD_PER_MILLION, estimate_cost
from slmops.evaluate.schema import Selection


def test_cost_matches_hand_computation() -> None:
    r = make_report()
    pi = r.profiles[0]
    sel = r.selection_for("pi")
    assert sel is not None and sel.variant == "q8"
    cost = estimate_cost(pi, sel, r.perf_for("q8", "pi"), cloud_usd_per_million=0.5)
    # q8 decodes 35 tok/s on the host x 0.5 relative speed = 17.5 tok/s -> 57,142.857 s per 1M tokens.
    # Hardware: $80 over 5 y x 365 d x 86,400 s x 0.2 = 31,536,000 generating seconds
    #   -> 80 x 57,142.857 / 31,536,000 = $0.144959.
    # Energy: 7 W x 57,142.857 s = 400,000 J = 0.1111 kWh x $0.20 = $0.022222.
    assert cost.hardware_usd_per_million_tokens == pytest.approx(0.144959, rel=1e-5)
    assert cost.energy_usd_per_million_tokens == pytest.approx(0.0222222, rel=1e-5)
    assert cost.device_usd_per_million_tokens == pytest.approx(0.167181, rel=1e-5)
    assert cost.cloud_usd_per_million_tokens == 0.5
    for fact in (
        "17.5 tok/s (projected for pi, estimate)",
        "20% utilization",
        "5 years",
        "7 W",
        "$0.20/kWh",
        "$0.50",
    ):
        assert fact in cost.assumptions


def test_no_selection_or_no_speed_gives_none_with_why() -> None:
    r = make_report()
    gw = r.profiles[1]
    none = estimate_cost(gw, r.selection_for("gw"), None)
    assert none.device_usd_per_million_tokens is None and none.variant is None
    assert "no variant fits gw" in none.assumptions
    assert none.cloud_usd_per_million_tokens == DEFAULT_CLOUD_USD_PER_MILLION
    no_tps = estimate_cost(r.profiles[0], Selection(profile="pi", variant="q8", reason="x"), None)
    assert no_tps.device_usd_per_million_tokens is None
    assert "no decode speed measured for q8 on pi" in no_tps.assumptions
