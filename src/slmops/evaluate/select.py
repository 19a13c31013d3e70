"""Fit and selection: which variants a device profile can run, and which one it should run.

`judge` lists *every* budget a variant broke (not just the first), because the person reading the
report needs to know whether a smaller quantization, a faster runtime or a better model is the
fix. `select` then takes the best quality among the variants that fit; near-equal quality (within
`tie_kld`) is not worth extra bytes or slower decoding, so ties go to the smaller, then faster one.

Budgets are about the device, so speed budgets use the projected numbers (host measurement x the
profile's relative speed), which are estimates; the report labels them so.

Speed figures are noisy (perf.py says why), so no decision may hinge on noise. The rule, so that
two evaluations of the same variants pick the same one:
- Decisions use the median over repeats, never one repeat.
- A speed budget (min decode tok/s, max TTFT) is broken only when the median misses it by more
  than the figure's noise: its spread over repeats, (max - min) / median, and at least 10 % (a
  steady figure still drifts that much between runs on a shared host). A median that misses by
  less passes, and the verdict notes it as "within noise of the budget"; such a figure with a
  spread above 10 % is also marked unstable in the report, so the slack it got is visible.
- Ties in quality (within `tie_kld`) go to the smaller file (sizes are exact and deterministic),
  then to the lower KLD, then to the name. Speed never breaks a tie: files of exactly the same
  size have the same tensor shapes and types, hence the same work per token, so any speed
  difference measured between them is noise. Measured here: two byte-identical copies of one
  Q8_0 file, interleaved, came out more than 10 % apart with a spread under 10 % each under
  contention, and the old "then faster" rule picked a different twin per run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from slmops.core.units import MIB, fmt_bytes
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import (
    UNSTABLE_SPREAD,
    PerfResult,
    QualityResult,
    Selection,
    Stat,
    VariantInfo,
    Verdict,
)

DEFAULT_TIE_KLD = 0.002


def fmt_num(x: float) -> str:
    """Compact number for reasons and tables: 3 significant digits, no exponent for usual sizes."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def device_decode_tps(profile: DeviceProfile, perf: PerfResult | None) -> float | None:
    """Decode tokens/s projected to the device (estimate); falls back to host x relative speed."""
    if perf is None or perf.status != "ok":
        return None
    if perf.projected_decode_tps is not None:
        return perf.projected_decode_tps
    if perf.decode_tps is not None:
        return perf.decode_tps.median * profile.relative_speed
    return None


def device_ttft_ms(profile: DeviceProfile, perf: PerfResult | None) -> float | None:
    """Time to first token projected to the device (estimate); falls back to host / relative speed."""
    if perf is None or perf.status != "ok":
        return None
    if perf.projected_ttft_ms is not None:
        return perf.projected_ttft_ms
    if perf.ttft_ms is not None:
        return perf.ttft_ms.median / profile.relative_speed
    return None


def noise(stat: Stat | None) -> float:
    """Relative tolerance of a speed figure: its spread over repeats, at least 10 %."""
    spread = stat.spread if stat is not None else 0.0
    return max(spread, UNSTABLE_SPREAD) if math.isfinite(spread) else math.inf


def judge(
    profile: DeviceProfile,
    variant: VariantInfo,
    quality: QualityResult | None,
    perf: PerfResult | None,
) -> Verdict:
    """Check one variant against every budget of one profile; each broken budget is one reason."""
    reasons: list[str] = []
    notes: list[str] = []
    ram = profile.ram_mb * MIB
    # profiles list the model formats their runtimes load (gguf: llama.cpp, onnx-genai: ORT GenAI)
    if variant.format not in profile.runtimes:
        reasons.append(
            f"runtime: {variant.runtime} ({variant.format}) not available on this device "
            f"(has: {', '.join(profile.runtimes)})"
        )
    storage = profile.storage_mb * MIB
    if variant.weights_bytes > storage:
        reasons.append(f"storage: {fmt_bytes(variant.weights_bytes)} > {fmt_bytes(storage)}")
    if perf is None:
        reasons.append("perf: not measured for this profile")
    elif perf.status == "does-not-fit":
        detail = perf.detail or f"exceeded the {fmt_bytes(perf.memory_ceiling_bytes)} ceiling"
        reasons.append(detail if detail.startswith("memory") else f"memory: {detail}")
    elif perf.status == "error":
        reasons.append(f"perf error: {perf.detail or 'the measurement failed'}")
    else:
        if perf.peak_rss_bytes is not None and perf.peak_rss_bytes.max > ram:
            reasons.append(
                f"memory: peak RSS {fmt_bytes(perf.peak_rss_bytes.max)} > {fmt_bytes(ram)} available"
            )
        ctx_mem = perf.memory_at_context_bytes
        if ctx_mem is not None and ctx_mem > ram:
            reasons.append(
                f"memory at context {profile.context_length}: {fmt_bytes(ctx_mem)} > {fmt_bytes(ram)}"
            )
        ttft, max_ttft = device_ttft_ms(profile, perf), profile.budgets.max_ttft_ms
        tol = noise(perf.ttft_ms)
        if ttft is None:
            reasons.append("time to first token: not measured")
        elif ttft > max_ttft * (1 + tol):
            reasons.append(f"time to first token: {ttft:.0f} ms (projected) > {max_ttft:.0f} ms")
        elif ttft > max_ttft:
            notes.append(
                f"time to first token: {ttft:.0f} ms (projected) > {max_ttft:.0f} ms "
                f"but within noise of the budget (±{tol:.0%}): not counted"
            )
        tps, min_tps = device_decode_tps(profile, perf), profile.budgets.min_decode_tps
        tol = noise(perf.decode_tps)
        if tps is None:
            reasons.append("decode: not measured")
        elif tps * (1 + tol) < min_tps:
            reasons.append(f"decode: {fmt_num(tps)} tok/s (projected) < {fmt_num(min_tps)} tok/s")
        elif tps < min_tps:
            notes.append(
                f"decode: {fmt_num(tps)} tok/s (projected) < {fmt_num(min_tps)} tok/s "
                f"but within noise of the budget (±{tol:.0%}): not counted"
            )
    if quality is None:
        reasons.append("quality: not measured")
    elif not math.isfinite(quality.kld_mean) or quality.kld_mean > profile.budgets.max_kld:
        reasons.append(f"quality: KLD {quality.kld_mean:.3g} > {profile.budgets.max_kld:g}")
    return Verdict(
        variant=variant.name, profile=profile.name, fits=not reasons, reasons=reasons, notes=notes
    )


def _perf_for(perf: Sequence[PerfResult], variant: str, profile: str) -> PerfResult | None:
    return next((p for p in perf if p.variant == variant and p.profile == profile), None)


def _no_fit_reason(profile: str, verdicts: list[Verdict]) -> str:
    if not verdicts:
        return "no variant fits: no variants were evaluated"
    budgets: Counter[str] = Counter()
    for v in verdicts:
        budgets.update({r.split(":", 1)[0] for r in v.reasons})
    n = len(verdicts)
    parts = [f"{name} ({count} of {n})" for name, count in budgets.most_common()]
    return f"no variant fits {profile}: broken budgets: {', '.join(parts)}"


def select(
    profile: DeviceProfile,
    variants: Sequence[VariantInfo],
    verdicts: Sequence[Verdict],
    quality: dict[str, QualityResult],
    perf: Sequence[PerfResult],
    *,
    tie_kld: float = DEFAULT_TIE_KLD,
) -> Selection:
    """Pick the best-quality fitting variant; within `tie_kld` of the best, prefer the smaller,
    then the lower KLD, then the name: never the faster (the rule in the module docstring)."""
    mine = {v.variant: v for v in verdicts if v.profile == profile.name}
    fitting = [v for v in variants if v.name in mine and mine[v.name].fits and v.name in quality]
    if not fitting:
        judged = [mine[v.name] for v in variants if v.name in mine]
        return Selection(
            profile=profile.name, variant=None, reason=_no_fit_reason(profile.name, judged)
        )

    def kld(v: VariantInfo) -> float:
        return quality[v.name].kld_mean

    best = min(fitting, key=lambda v: (kld(v), v.weights_bytes, v.name))
    best_kld = kld(best)
    ties = [v for v in fitting if kld(v) <= best_kld + tie_kld]
    chosen = min(ties, key=lambda v: (v.weights_bytes, kld(v), v.name))
    n = len(fitting)
    head = f"lowest KLD {best_kld:.3g} among {n} fitting variant{'s' if n != 1 else ''}"
    why = []
    if chosen.weights_bytes < best.weights_bytes:
        why.append(
            f"is smaller ({fmt_bytes(chosen.weights_bytes)} vs {fmt_bytes(best.weights_bytes)})"
        )
    same = [t for t in ties if t is not chosen and t.weights_bytes == chosen.weights_bytes]
    if same:
        lower = all(kld(chosen) < kld(t) for t in same)
        why.append(
            f"{'has a lower KLD than' if lower else 'comes before'} {', '.join(t.name for t in same)} "
            f"of the same size{'' if lower else ' by name'} (speed does not break ties: "
            "same-size files do the same work, so their speed difference is noise)"
        )
    if chosen.name == best.name:
        reason = head
        if len(ties) > 1:
            reason += f"; the smallest of the {len(ties)} within {tie_kld:g} of it"
            reason += f" and {why[-1]}" if same else ""
    else:
        reason = (
            f"{head} ({best.name}); {chosen.name} (KLD {quality[chosen.name].kld_mean:.3g}) "
            f"ties with {best.name} within {tie_kld:g} and {' and '.join(why)}"
        )
    return Selection(profile=profile.name, variant=chosen.name, reason=reason)


def pareto_front(
    points: Sequence[tuple[str, float, float]], *, maximize_y: bool = False
) -> list[str]:
    """Names of the non-dominated points, ordered by x.

    x is always minimised (size, or KLD); y is minimised (KLD) or, with `maximize_y`, maximised
    (tokens/s). A point is dominated when another is at least as good on both and better on one.
    Points with a non-finite coordinate are ignored.
    """
    sign = -1.0 if maximize_y else 1.0
    pts = [(n, x, sign * y) for n, x, y in points if math.isfinite(x) and math.isfinite(y)]
    front = [
        (n, x, y)
        for n, x, y in pts
        if not any(ox <= x and oy <= y and (ox < x or oy < y) for _, ox, oy in pts)
    ]
    return [n for n, _, _ in sorted(front, key=lambda p: (p[1], p[2], p[0]))]


def decide(
    profiles: Sequence[DeviceProfile],
    variants: Sequence[VariantInfo],
    quality: dict[str, QualityResult],
    perf: Sequence[PerfResult],
    *,
    tie_kld: float = DEFAULT_TIE_KLD,
) -> tuple[list[Verdict], list[Selection]]:
    """Judge every variant x profile and select per profile: the report's verdicts and selections.

    `quality` maps variant name to its result (quality does not depend on the device); `perf`
    holds one result per variant x profile. Returns verdicts in profile-major order, and one
    selection per profile in the order of `profiles`.
    """
    verdicts = [
        judge(p, v, quality.get(v.name), _perf_for(perf, v.name, p.name))
        for p in profiles
        for v in variants
    ]
    selections = [select(p, variants, verdicts, quality, perf, tie_kld=tie_kld) for p in profiles]
    return verdicts, selections
