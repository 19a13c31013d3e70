"""Fit and selection: which variants a device profile can run, and which one it should run.

`judge` lists *every* budget a variant broke (not just the first), because the person reading the
report needs to know whether a smaller quantization, a faster runtime or a better model is the
fix. `select` then takes the best quality among the variants that fit; near-equal quality (within
`tie_kld`) is not worth extra bytes or slower decoding, so ties go to the smaller, then faster one.

Budgets are about the device, so speed budgets use the projected numbers (host measurement x the
profile's relative speed), which are estimates; the report labels them so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import PerfResult, QualityResult, Selection, VariantInfo, Verdict

DEFAULT_TIE_KLD = 0.002
MIB = 2**20


def fmt_bytes(n: float) -> str:
    """Human size in binary units (the profile's ram_mb/storage_mb are MiB), e.g. '812 MB'."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    if n >= 10 * MIB:
        return f"{n / MIB:.0f} MB"
    if n >= MIB:
        return f"{n / MIB:.1f} MB"
    return f"{n / 1024:.0f} KB"


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


def judge(
    profile: DeviceProfile,
    variant: VariantInfo,
    quality: QualityResult | None,
    perf: PerfResult | None,
) -> Verdict:
    """Check one variant against every budget of one profile; each broken budget is one reason."""
    reasons: list[str] = []
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
        ttft = device_ttft_ms(profile, perf)
        if ttft is None:
            reasons.append("time to first token: not measured")
        elif ttft > profile.budgets.max_ttft_ms:
            reasons.append(
                f"time to first token: {ttft:.0f} ms (projected) > {profile.budgets.max_ttft_ms:.0f} ms"
            )
        tps = device_decode_tps(profile, perf)
        if tps is None:
            reasons.append("decode: not measured")
        elif tps < profile.budgets.min_decode_tps:
            reasons.append(
                f"decode: {fmt_num(tps)} tok/s (projected) < {fmt_num(profile.budgets.min_decode_tps)} tok/s"
            )
    if quality is None:
        reasons.append("quality: not measured")
    elif not math.isfinite(quality.kld_mean) or quality.kld_mean > profile.budgets.max_kld:
        reasons.append(f"quality: KLD {quality.kld_mean:.3g} > {profile.budgets.max_kld:g}")
    return Verdict(variant=variant.name, profile=profile.name, fits=not reasons, reasons=reasons)


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
    """Pick the best-quality fitting variant; within `tie_kld` of the best, prefer smaller, then faster."""
    mine = {v.variant: v for v in verdicts if v.profile == profile.name}
    fitting = [v for v in variants if v.name in mine and mine[v.name].fits and v.name in quality]
    if not fitting:
        judged = [mine[v.name] for v in variants if v.name in mine]
        return Selection(
            profile=profile.name, variant=None, reason=_no_fit_reason(profile.name, judged)
        )

    def tps(v: VariantInfo) -> float:
        return device_decode_tps(profile, _perf_for(perf, v.name, profile.name)) or 0.0

    best = min(fitting, key=lambda v: (quality[v.name].kld_mean, v.weights_bytes, -tps(v), v.name))
    best_kld = quality[best.name].kld_mean
    ties = [v for v in fitting if quality[v.name].kld_mean <= best_kld + tie_kld]
    chosen = min(ties, key=lambda v: (v.weights_bytes, -tps(v), quality[v.name].kld_mean, v.name))
    n = len(fitting)
    head = f"lowest KLD {best_kld:.3g} among {n} fitting variant{'s' if n != 1 else ''}"
    why = []
    if chosen.weights_bytes < best.weights_bytes:
        why.append(
            f"is smaller ({fmt_bytes(chosen.weights_bytes)} vs {fmt_bytes(best.weights_bytes)})"
        )
    same = [t.name for t in ties if t is not chosen and t.weights_bytes == chosen.weights_bytes]
    if same:
        why.append(
            f"is faster than {', '.join(same)} of the same size "
            f"({fmt_num(tps(chosen))} tok/s projected)"
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
