"""Fit and selection rules on a hand-built report (pure logic, numbers chosen to hit each rule).

The report comes from tests/factories/reports.py, shared with test_gate, test_cost and test_render.
"""

from __future__ import annotations

from factories.reports import (
    GB,
    VARIANTS,
    make_report,
)
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import (
    EvalReport,
    PerfResult,
    Stat,
)
from slmops.evaluate.select import decide, judge, pareto_front, select


def _verdict(report: EvalReport, variant: str, profile: str) -> list[str]:
    v = next(v for v in report.verdicts if v.variant == variant and v.profile == profile)
    assert v.fits == (not v.reasons)
    return v.reasons


def test_variant_breaking_several_budgets_lists_all_of_them() -> None:
    reasons = _verdict(make_report(), "int4", "gw")
    text = "\n".join(reasons)
    assert (
        "runtime: onnxruntime-genai (onnx-genai) not available on this device (has: gguf)"
        in reasons
    )
    assert "memory: peak RSS 750 MiB > 700 MiB available" in reasons
    assert "memory at context 1024: 950 MiB > 700 MiB" in reasons
    assert "time to first token: 3333 ms (projected) > 3000 ms" in reasons
    assert "quality: KLD 0.35 > 0.25" in text
    assert len(reasons) == 5


def test_does_not_fit_and_speed_and_storage_reasons() -> None:
    report = make_report()
    assert _verdict(report, "f16", "gw") == ["memory: peak RSS exceeded the 700 MB ceiling"]
    slow = report.profiles[0].model_copy(update={"storage_mb": 1024})
    slow.budgets = slow.budgets.model_copy(update={"min_decode_tps": 12})
    f16 = report.variants[0]
    v = judge(slow, f16, report.quality["f16"], report.perf_for("f16", "pi"))
    assert v.reasons == ["storage: 2.0 GiB > 1.0 GiB", "decode: 10 tok/s (projected) < 12 tok/s"]
    missing = judge(slow, report.variants[1], None, None)
    assert "perf: not measured for this profile" in missing.reasons
    assert "quality: not measured" in missing.reasons


def test_selection_picks_lowest_kld_without_ties() -> None:
    r = make_report()
    sel = select(r.profiles[0], r.variants, r.verdicts, r.quality, r.perf, tie_kld=0.0)
    assert sel.variant == "f16"
    assert sel.reason.startswith("lowest KLD 0.0004 among 3 fitting variants")


def test_tie_goes_to_the_smaller_variant() -> None:
    sel = make_report().selection_for("pi")
    assert sel is not None and sel.variant == "q8"
    assert (
        "q8 (KLD 0.0015) ties with f16 within 0.002 and is smaller (1.1 GiB vs 2.0 GiB)"
        in sel.reason
    )


def test_tie_of_equal_size_goes_to_the_lower_kld_not_the_faster() -> None:
    specs = dict(VARIANTS)
    specs["q8b"] = ("gguf", specs["q8"][1], 0.0016, 45.0, 250.0, int(1.2 * GB))  # 29 % faster
    sel = make_report(specs).selection_for("pi")
    assert sel is not None and sel.variant == "q8"
    assert "has a lower KLD than q8b of the same size (speed does not break ties" in sel.reason


def test_nothing_fits_gives_none_and_summarises_budgets() -> None:
    sel = make_report().selection_for("gw")
    assert sel is not None and sel.variant is None
    assert sel.reason.startswith("no variant fits gw: broken budgets: memory (4 of 4)")
    assert "runtime (1 of 4)" in sel.reason and "quality (1 of 4)" in sel.reason


def test_pareto_front_minimise_and_maximise() -> None:
    pts = [("a", 1.0, 0.5), ("b", 2.0, 0.1), ("c", 3.0, 0.2), ("d", 0.5, 0.9)]
    assert pareto_front(pts) == ["d", "a", "b"]
    # KLD (minimise) against tok/s (maximise): c is both worse and slower than e.
    speed = [("a", 0.001, 10.0), ("b", 0.01, 30.0), ("c", 0.05, 20.0), ("e", 0.02, 40.0)]
    assert pareto_front(speed, maximize_y=True) == ["a", "b", "e"]
    assert pareto_front([("x", float("nan"), 1.0)]) == []


def _with_speed(
    perf: PerfResult, profile: DeviceProfile, tps: list[float], ttft: list[float] | None = None
) -> PerfResult:
    """`perf` with host decode tok/s (and TTFT ms) repeats replaced, projections recomputed."""
    rel = profile.relative_speed
    t, d = Stat.of(ttft) if ttft else perf.ttft_ms, Stat.of(tps)
    assert t is not None
    return perf.model_copy(
        update={
            "decode_tps": d,
            "ttft_ms": t,
            "projected_decode_tps": d.median * rel,
            "projected_ttft_ms": t.median / rel,
        }
    )


def test_speed_budget_missed_within_noise_is_not_counted() -> None:
    r = make_report()
    pi, q4 = r.profiles[0], r.variants[2]
    perf = r.perf_for("q4", "pi")
    assert perf is not None
    # budget 8 tok/s, relative speed 0.5: host 15.2 -> 7.6 projected, 5 % under, spread 4 %
    near = _with_speed(perf, pi, [15.2, 15.0, 15.6])
    v = judge(pi, q4, r.quality["q4"], near)
    assert v.fits and not v.reasons
    assert v.notes == [
        "decode: 7.6 tok/s (projected) < 8 tok/s but within noise of the budget (±10%): not counted"
    ]
    # 13 % under a steady figure: broken
    far = _with_speed(perf, pi, [14.0, 13.9, 14.1])
    v = judge(pi, q4, r.quality["q4"], far)
    assert v.reasons == ["decode: 7 tok/s (projected) < 8 tok/s"] and not v.notes
    # the same 13 % under with a 17 % spread (unstable): within its noise, so not counted
    shaky = _with_speed(perf, pi, [14.0, 12.8, 15.2])
    assert judge(pi, q4, r.quality["q4"], shaky).fits
    # TTFT: budget 1500 ms; 1600 ms projected (7 % over) passes, 1700 (13 % over) does not
    v = judge(pi, q4, r.quality["q4"], _with_speed(perf, pi, [50.0] * 3, [800.0, 790, 810]))
    assert v.fits and v.notes[0].startswith("time to first token: 1600 ms (projected) > 1500 ms")
    v = judge(pi, q4, r.quality["q4"], _with_speed(perf, pi, [50.0] * 3, [850.0, 840, 860]))
    assert v.reasons == ["time to first token: 1700 ms (projected) > 1500 ms"]


def test_same_size_twins_pick_by_name_whichever_measured_faster() -> None:
    """Two runs that swap which of two identical variants measured faster pick the same one."""
    specs = dict(VARIANTS)
    specs["q8b"] = specs["q8"]
    picks = []
    for q8_tps, q8b_tps in ((30.0, 40.0), (40.0, 30.0)):
        r = make_report(specs)
        pi = r.profiles[0]
        speeds = {"q8": q8_tps, "q8b": q8b_tps}
        perf = [
            _with_speed(p, pi, [speeds[p.variant]] * 3)
            if p.profile == "pi" and p.variant in speeds
            else p
            for p in r.perf
        ]
        _, selections = decide(r.profiles, r.variants, r.quality, perf)
        picks.append(selections[0].variant)
        assert "comes before q8b of the same size by name" in str(selections[0].reason)
    assert picks == ["q8", "q8"]
