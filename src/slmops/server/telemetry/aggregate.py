"""Merging telemetry aggregates, and the figures derived from them. Pure functions, no I/O.

An accumulator (``Acc``, a plain JSON-able dict, so the hourly roll-up stores it as is) holds
sums only, so merging is associative and commutative: counts and token totals add, histograms
add bucket by bucket (every device uses the shared ``BOUNDS``), log-probability and entropy are
kept as sums weighted by ``quality_tokens`` (their means are weighted means), ``peak_rss_bytes``
keeps the maximum, ``noised`` is the union of the figures any window perturbed, ``epsilon`` the
largest budget spent on one window.

Quantiles (p50/p95) come from merged buckets by linear interpolation inside the bucket that holds
the rank: bucket ``i`` covers ``(bounds[i-1], bounds[i]]`` with a lower edge of 0 for the first
bucket (for ``logprob``, whose first bucket is open below, a rank there answers its bound); a rank in the open last bucket answers its lower edge (the last bound), so a p95 there
reads "at least this". Negative bucket counts (DP noise) are treated as 0.
"""

from __future__ import annotations

from typing import Any

from slmops.protocol.telemetry import BOUNDS

Acc = dict[str, Any]

_SUMS = (
    "windows",
    "requests",
    "errors",
    "prompt_tokens",
    "output_tokens",
    "logprob_sum",
    "entropy_sum",
    "quality_tokens",
    "entropy_tokens",
    "health_ok",
    "health_failed",
    "feedback_up",
    "feedback_down",
)


def empty() -> Acc:
    acc: Acc = {k: 0.0 for k in _SUMS}
    acc.update(error_kinds={}, histograms={}, peak_rss_bytes=0, noised=[], epsilon=None)
    return acc


def from_window(window: dict[str, Any]) -> Acc:
    """An accumulator for one window as the device sent it (``WindowAggregate`` JSON)."""
    acc = empty()
    errors = {str(k): float(v) for k, v in (window.get("errors") or {}).items()}
    qt = float(window.get("quality_tokens") or 0)
    lp, ent = window.get("logprob_mean"), window.get("entropy_mean")
    feedback = window.get("feedback") or {}
    acc.update(
        windows=1.0,
        requests=float(window.get("requests") or 0),
        errors=sum(errors.values()),
        error_kinds=errors,
        prompt_tokens=float(window.get("prompt_tokens") or 0),
        output_tokens=float(window.get("output_tokens") or 0),
        logprob_sum=float(lp) * qt if lp is not None else 0.0,
        quality_tokens=qt if lp is not None else 0.0,
        entropy_sum=float(ent) * qt if ent is not None else 0.0,
        entropy_tokens=qt if ent is not None else 0.0,
        health_ok=float(window.get("health_ok") or 0),
        health_failed=float(window.get("health_failed") or 0),
        feedback_up=float(feedback.get("up") or 0),
        feedback_down=float(feedback.get("down") or 0),
        peak_rss_bytes=int(window.get("peak_rss_bytes") or 0),
        noised=sorted(set(window.get("noised") or [])),
        epsilon=window.get("epsilon"),
        histograms={
            name: {
                "counts": list(map(float, h["counts"])),
                "sum": float(h.get("sum") or 0),
                "count": float(h.get("count") or 0),
            }
            for name, h in (window.get("histograms") or {}).items()
            if name in BOUNDS
        },
    )
    return acc


def merge(a: Acc, b: Acc) -> Acc:
    """A new accumulator holding both (neither argument is changed)."""
    return merge_into(merge_into(empty(), a), b)


def merge_into(acc: Acc, other: Acc) -> Acc:
    """``acc`` with ``other`` added (``acc`` is changed and returned, ``other`` is not): the
    ingestion path merges every window into an accumulator it owns, and building a new one
    per merge was a tenth of its time."""
    get = other.get
    for k in _SUMS:
        acc[k] = float(acc.get(k, 0.0)) + float(get(k, 0.0))
    kinds = acc.get("error_kinds")
    kinds = acc["error_kinds"] = dict(kinds) if kinds else {}
    for kind, n in (get("error_kinds") or {}).items():
        kinds[kind] = kinds.get(kind, 0.0) + n
    hists = acc.get("histograms")
    hists = acc["histograms"] = dict(hists) if hists else {}
    for name, h in (get("histograms") or {}).items():
        mine = hists.get(name)
        if mine is None:
            hists[name] = _copy(h)
            continue
        hists[name] = {
            "counts": [x + y for x, y in zip(mine["counts"], h["counts"], strict=True)],
            "sum": mine["sum"] + h["sum"],
            "count": mine["count"] + h["count"],
        }
    acc["peak_rss_bytes"] = max(int(acc.get("peak_rss_bytes", 0)), int(get("peak_rss_bytes", 0)))
    theirs = get("noised") or []
    if theirs or "noised" not in acc:
        acc["noised"] = sorted(set(acc.get("noised") or []) | set(theirs))
    eps = [e for e in (acc.get("epsilon"), get("epsilon")) if e is not None]
    acc["epsilon"] = max(eps) if eps else None
    return acc


def _copy(h: dict[str, Any]) -> dict[str, Any]:
    return {"counts": list(h["counts"]), "sum": h["sum"], "count": h["count"]}


def quantile(name: str, counts: list[float], q: float) -> float | None:
    """The ``q`` quantile of histogram ``name`` from its bucket counts (see the module doc)."""
    bounds = BOUNDS[name]
    clean = [max(0.0, c) for c in counts]
    total = sum(clean)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(clean):
        if c <= 0:
            continue
        if seen + c >= rank:
            if i == len(bounds):  # the open last bucket
                return float(bounds[-1])
            hi = float(bounds[i])
            # the first bucket starts at 0 (non-negative metrics) or is open below (log-probs)
            first = 0.0 if hi > 0 else hi
            lo = float(bounds[i - 1]) if i > 0 else first
            return lo + (hi - lo) * (rank - seen) / c
        seen += c
    return float(bounds[-1])


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def hist_mean(acc: Acc, name: str) -> float | None:
    h = (acc.get("histograms") or {}).get(name)
    return _ratio(h["sum"], h["count"]) if h else None


def hist_quantile(acc: Acc, name: str, q: float) -> float | None:
    h = (acc.get("histograms") or {}).get(name)
    return quantile(name, h["counts"], q) if h else None


def figures(acc: Acc) -> dict[str, Any]:
    """The derived figures of an accumulator (keys documented in ``query.summarize``)."""
    out_mean = hist_mean(acc, "output_tokens")
    if out_mean is None:
        out_mean = _ratio(acc["output_tokens"], acc["requests"])
    return {
        "windows": int(acc["windows"]),
        "requests": acc["requests"],
        "errors": acc["errors"],
        "errors_by_kind": dict(acc.get("error_kinds") or {}),
        "error_rate": _ratio(acc["errors"], acc["requests"]),
        "ttft_p50_ms": hist_quantile(acc, "ttft_ms", 0.5),
        "ttft_p95_ms": hist_quantile(acc, "ttft_ms", 0.95),
        "latency_p50_ms": hist_quantile(acc, "latency_ms", 0.5),
        "latency_p95_ms": hist_quantile(acc, "latency_ms", 0.95),
        "tokens_per_s": hist_mean(acc, "decode_tps"),
        "output_tokens_mean": out_mean,
        "prompt_tokens": acc["prompt_tokens"],
        "output_tokens": acc["output_tokens"],
        "logprob_mean": _ratio(acc["logprob_sum"], acc["quality_tokens"]),
        "entropy_mean": _ratio(acc["entropy_sum"], acc["entropy_tokens"]),
        "quality_tokens": acc["quality_tokens"],
        "feedback_up": acc["feedback_up"],
        "feedback_down": acc["feedback_down"],
        "health_ok": acc["health_ok"],
        "health_failed": acc["health_failed"],
        "peak_rss_bytes": acc["peak_rss_bytes"],
        "noised": list(acc.get("noised") or []),
        "epsilon": acc.get("epsilon"),
    }
