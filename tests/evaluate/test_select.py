"""Fit and selection rules on a hand-built report (pure logic, numbers chosen to hit each rule).

`make_report` is also imported by test_gate, test_cost and test_render.
"""

from __future__ import annotations

from slmops.evaluate.cost import estimate_costs
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import (
    EvalReport,
    HostInfo,
    PerfResult,
    QualityProtocol,
    QualityResult,
    Stat,
    VariantInfo,
)
from slmops.evaluate.select import decide, judge, pareto_front, select

MB = 2**20
GB = 2**30


def make_profile(name: str, **over: object) -> DeviceProfile:
    base: dict[str, object] = {
        "name": name,
        "description": f"test device {name}",
        "arch": "arm64",
        "cores": 4,
        "ram_mb": 4096,
        "storage_mb": 32768,
        "runtimes": ["gguf", "onnx-genai"],
        "context_length": 2048,
        "prompt_tokens": 128,
        "relative_speed": 0.5,
        "budgets": {"max_ttft_ms": 1500, "min_decode_tps": 8, "max_kld": 0.15},
        "cost": {"hardware_usd": 80, "lifetime_years": 5, "power_watts": 7, "utilization": 0.2},
    }
    return DeviceProfile.model_validate(base | over)


# name -> (runtime, weights bytes, KLD, host decode tok/s, host TTFT ms, peak RSS bytes)
VARIANTS = {
    "f16": ("gguf", 2 * GB, 0.0004, 20.0, 200.0, int(2.1 * GB)),
    "q8": ("gguf", int(1.1 * GB), 0.0015, 35.0, 250.0, int(1.2 * GB)),
    "q4": ("gguf", 600 * MB, 0.04, 50.0, 300.0, 720 * MB),
    "int4": ("onnx-genai", 650 * MB, 0.35, 60.0, 500.0, 750 * MB),
}


def _perf(
    profile: DeviceProfile, name: str, spec: tuple[str, int, float, float, float, int]
) -> PerfResult:
    runtime, size, _, tps, ttft, rss = spec
    ram = profile.ram_mb * MB
    common = {
        "variant": name,
        "profile": profile.name,
        "runtime": runtime,
        "threads": 2,
        "repeats": 3,
        "memory_ceiling_bytes": ram,
    }
    if size > ram:  # weights alone exceed the ceiling: the runner reports it without numbers
        return PerfResult(
            **common, status="does-not-fit", detail=f"peak RSS exceeded the {ram // MB} MB ceiling"
        )
    rel = profile.relative_speed
    return PerfResult(
        **common,
        status="ok",
        load_time_s=Stat.of([0.1, 0.12, 0.11]),
        ttft_ms=Stat.of([ttft, ttft * 0.95, ttft * 1.05]),
        decode_tps=Stat.of([tps, tps * 0.95, tps * 1.05]),
        peak_rss_bytes=Stat.of([rss - MB, rss, rss - 2 * MB]),
        memory_at_context_bytes=rss + 200 * MB,
        projected_ttft_ms=ttft / rel,
        projected_decode_tps=tps * rel,
    )


def make_report(
    variants: dict[str, tuple[str, int, float, float, float, int]] | None = None,
) -> EvalReport:
    """Two profiles: `pi` (roomy; f16, q8, q4 fit) and `gw` (700 MB, gguf only; nothing fits)."""
    specs = VARIANTS if variants is None else variants
    profiles = [
        make_profile("pi"),
        make_profile(
            "gw",
            ram_mb=700,
            storage_mb=4096,
            runtimes=["gguf"],
            context_length=1024,
            relative_speed=0.15,
            budgets={"max_ttft_ms": 3000, "min_decode_tps": 4, "max_kld": 0.25},
            cost={"hardware_usd": 60, "lifetime_years": 5, "power_watts": 4, "utilization": 0.2},
        ),
    ]
    infos = [
        VariantInfo(
            name=n,
            path=f"/v/{n}",
            format=s[0],
            runtime={"gguf": "llama.cpp", "onnx-genai": "onnxruntime-genai"}[s[0]],
            weights_bytes=s[1],
            digest="sha256:" + "0" * 64,
        )
        for n, s in specs.items()
    ]
    quality = {
        n: QualityResult(
            kld_mean=s[2],
            kld_p99=s[2] * 10,
            kld_ci95=(s[2] * 0.8, s[2] * 1.2),
            top1_agreement=1 - s[2],
            perplexity=220 * (1 + s[2]),
            reference_perplexity=220.0,
            greedy_agreement=0.9,
            greedy_prompts=8,
        )
        for n, s in specs.items()
    }
    perf = [_perf(p, n, s) for p in profiles for n, s in specs.items()]
    verdicts, selections = decide(profiles, infos, quality, perf)
    report = EvalReport(
        slmops_version="0.1.0",
        reference={"name": "tiny-llama", "digest": "sha256:abc"},
        host=HostInfo(cpu="test cpu", cores=2, ram_bytes=8 * GB, platform="linux"),
        protocol=QualityProtocol(
            text_source="heldout.txt",
            text_digest="ab" * 32,
            windows=8,
            window_tokens=256,
            scored_from=128,
            tokens_scored=1024,
            bos=True,
            description="8 windows of 256 tokens; the second half of each is scored.",
        ),
        profiles=profiles,
        variants=infos,
        quality=quality,
        perf=perf,
        verdicts=verdicts,
        selections=selections,
    )
    report.costs = estimate_costs(report)
    return report


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
