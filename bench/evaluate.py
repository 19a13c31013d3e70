"""Benchmark the evaluate stage's perf harness on the demo model, side by side in one run.

Prints, for each runtime (llama.cpp on gguf-q4_k_m and gguf-f16, ONNX Runtime GenAI on
onnx-int4, transformers on the HF model) at the same thread count:
- decode tokens/s measured by the harness (pinned subprocess, RSS watchdog), TTFT, load time and
  peak RSS, next to
- decode tokens/s from the runtime called directly in this process (`direct_decode_tps`),
- and the ratio harness / direct: what the harness costs (target: ratio >= 0.95).

The two are interleaved over --rounds rounds so that load from other processes on a shared
machine hits both alike; the ratio is the median of the per-round ratios.

`speed_spread` prints, per variant, the decode tok/s spread over repeats (min / median / max,
(max - min) / median) measured the old way (each variant alone, 3 repeats of one 64-token
generation) and the new way (variants interleaved round by round, each repeat summing >= 0.3 s
of decoding), side by side, with the CPU share the measuring process got (contention).

Then `evaluate_wall_times` runs the whole evaluation (quality, perf with 3 repeats of 64
tokens, selection, report) of the default recipe's variants on three built-in profiles and
times it per variant (target: under 5 minutes in all on 2 cores).

The demo model and the variants are cached (~/.cache/slmops), so only the first run trains
and converts.

    .venv/bin/python bench/evaluate.py [--threads 2] [--tokens 64] [--rounds 3] [--json]
    .venv/bin/python bench/evaluate.py --spread-only --variants-dir DIR   # any variants folder
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from slmops.cli.optimize import default_recipe_path
from slmops.evaluate.perf import direct_decode_tps, measure
from slmops.evaluate.perf_child import build_prompt
from slmops.evaluate.profiles import Budgets, CostModel, DeviceProfile
from slmops.model.demo import train_demo_model
from slmops.optimize.engine import run_recipe
from slmops.optimize.recipe import load_recipe
from slmops.runtimes import open_runtime

CACHE = Path.home() / ".cache" / "slmops"
VARIANTS = ["gguf-q4_k_m", "gguf-f16", "onnx-int4"]
WALL_PROFILES = ["arm-gateway-2gb", "rpi5-8gb", "x86-minipc-16gb"]


def bench_profile(threads: int, prompt_tokens: int) -> DeviceProfile:
    """The host itself as a profile: `threads` cores, memory to spare, speed 1."""
    return DeviceProfile(
        name="bench-host",
        arch="x86_64",
        cores=threads,
        ram_mb=16384,
        storage_mb=65536,
        runtimes=["gguf", "onnx-genai"],
        context_length=512,
        prompt_tokens=prompt_tokens,
        relative_speed=1.0,
        budgets=Budgets(max_ttft_ms=1e6, min_decode_tps=0, max_kld=1e6),
        cost=CostModel(hardware_usd=0, lifetime_years=1, power_watts=0),
    )


def prepare(minutes: float) -> tuple[dict[str, Path], str]:
    """Demo model + the three runtime variants (cached), and the prompt text (held-out split)."""
    model = train_demo_model(CACHE / "bench-evaluate" / "model", minutes=minutes).path
    run = run_recipe(
        model, load_recipe(default_recipe_path()), CACHE / "bench-variants", only=VARIANTS
    )
    dirs = {v.name: v.path for v in run.variants}
    dirs["hf"] = model
    held = model / "heldout.txt"
    text = held.read_text(encoding="utf-8") if held.exists() else json.__doc__ or "x"
    return dirs, text[:20_000]


def harness_vs_direct(
    name: str, path: Path, text: str, threads: int, tokens: int, rounds: int
) -> dict[str, Any]:
    profile = bench_profile(threads, 128)
    n_ctx = 512
    rt = open_runtime(path, threads=threads, n_ctx=n_ctx)
    ids = build_prompt(rt, text, profile.prompt_tokens)
    rt.close()
    direct, harness, ratios = [], [], []
    last = None
    for _ in range(rounds):
        d = direct_decode_tps(path, threads, ids, tokens, n_ctx=n_ctx, repeats=3)
        last = measure(name, path, profile, text=text, repeats=3, max_tokens=tokens)
        if last.status != "ok" or last.decode_tps is None:
            return {"variant": name, "status": last.status, "detail": last.detail}
        direct.append(d)
        harness.append(last.decode_tps.median)
        ratios.append(last.decode_tps.median / d)
    assert last is not None and last.ttft_ms and last.load_time_s and last.peak_rss_bytes
    return {
        "variant": name,
        "runtime": last.runtime,
        "status": last.status,
        "threads": last.threads,
        "harness_decode_tps": round(statistics.median(harness), 1),
        "direct_decode_tps": round(statistics.median(direct), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "ttft_ms": round(last.ttft_ms.median, 2),
        "load_ms": round(last.load_time_s.median * 1000, 1),
        "peak_rss_mb": round(last.peak_rss_bytes.max / 1e6, 1),
    }


def _spread_row(res: Any) -> dict[str, Any]:
    if res.status != "ok" or res.decode_tps is None:
        return {"status": res.status, "detail": res.detail}
    d = res.decode_tps
    share = res.cpu_share.median if res.cpu_share else None
    return {
        "min": round(d.min, 1),
        "median": round(d.median, 1),
        "max": round(d.max, 1),
        "spread": round(d.spread, 3),
        "unstable": d.unstable,
        "decode_tokens": res.decode_tokens,
        "cpu_share": None if share is None else round(share, 2),
    }


def speed_spread(
    dirs: dict[str, Path], text: str, threads: int, repeats: int = 3
) -> list[dict[str, Any]]:
    """Decode tok/s spread per variant: old harness (alone, one 64-token run per repeat) vs new."""
    from slmops.evaluate.perf import DEFAULT_MIN_DECODE_S, measure_interleaved

    profile = bench_profile(threads, 128)
    items = [(n, p) for n, p in dirs.items() if n != "hf"]
    before = {
        n: measure(
            n,
            p,
            profile,
            text=text,
            repeats=repeats,
            max_tokens=64,
            min_decode_s=0,
            min_decode_tokens=0,
        )
        for n, p in items
    }
    after = measure_interleaved(
        items, profile, text=text, repeats=repeats, max_tokens=64, min_decode_s=DEFAULT_MIN_DECODE_S
    )
    return [
        {"variant": r.variant, "before": _spread_row(before[r.variant]), "after": _spread_row(r)}
        for r in after
    ]


def _print_spread(rows: list[dict[str, Any]], threads: int) -> None:
    print(f"\ndecode tok/s over repeats, {threads} threads: min / median / max (spread)")
    print(
        f"{'variant':24} {'before: alone, 1 x 64 tokens':>40}   {'after: interleaved, >= 0.3 s':>40}"
    )
    for r in rows:
        cells = []
        for key in ("before", "after"):
            c = r[key]
            if "median" not in c:
                cells.append(f"{c['status']:>40}")
                continue
            mark = " UNSTABLE" if c["unstable"] else ""
            cells.append(
                f"{c['min']:8.0f} / {c['median']:8.0f} / {c['max']:8.0f} ({c['spread']:5.0%}{mark})"
                f" cpu {c['cpu_share']:.0%}".rjust(40)
            )
        print(f"{r['variant']:24} {cells[0]}   {cells[1]}")


class _Clock:
    """Listener that charges the time between progress events to the variant named first."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.phase_name = ""
        self.spent: dict[tuple[str, str], float] = {}

    def phase(self, name: str, total: int) -> None:
        self.phase_name, self.last = name, time.perf_counter()

    def advance(self, description: str) -> None:
        now = time.perf_counter()
        key = (self.phase_name, description.split(" ", 1)[0].rstrip(":"))
        self.spent[key] = self.spent.get(key, 0.0) + now - self.last
        self.last = now


def evaluate_wall_times(model: Path) -> dict[str, Any]:
    """The full evaluation of the default recipe on three built-in profiles, timed per variant."""
    import tempfile

    from slmops.evaluate.profiles import resolve_profiles
    from slmops.evaluate.runner import evaluate

    variants_dir = CACHE / "bench-variants"
    run_recipe(model, load_recipe(default_recipe_path()), variants_dir)
    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="slmops-bench-eval-") as tmp:
        t0 = time.perf_counter()
        report = evaluate(
            variants_dir, resolve_profiles(WALL_PROFILES), Path(tmp) / "report", listener=clock
        )
        total = time.perf_counter() - t0
    rows = [
        {
            "variant": v.name,
            "quality_s": round(clock.spent.get(("quality", v.name), 0.0), 2),
            "perf_s": round(clock.spent.get(("performance", v.name), 0.0), 2),
        }
        for v in report.variants
    ]
    return {
        "profiles": WALL_PROFILES,
        "variants": len(rows),
        "total_s": round(total, 1),
        "reference_s": round(clock.spent.get(("quality", "reference"), 0.0), 2),
        "rows": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per generation")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved harness/direct rounds")
    ap.add_argument("--minutes", type=float, default=3.0, help="demo model training budget")
    ap.add_argument("--no-wall", action="store_true", help="skip the evaluation wall-time table")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--spread-only", action="store_true", help="only the spread table")
    ap.add_argument("--variants-dir", type=Path, help="measure these variants (spread only)")
    ap.add_argument("--text", type=Path, help="prompt text for --variants-dir")
    args = ap.parse_args()

    if args.variants_dir:
        from slmops.model.variants import discover_variants

        found = {v.name: v.path for v in discover_variants(args.variants_dir)}
        prompt = args.text.read_text() if args.text else json.__doc__ or "x"
        rows = speed_spread(found, prompt[:20_000], args.threads, args.rounds)
        print(json.dumps(rows, indent=2)) if args.json else _print_spread(rows, args.threads)
        return 0
    dirs, text = prepare(args.minutes)
    spread = speed_spread(dirs, text, args.threads, args.rounds)
    if args.spread_only:
        print(json.dumps(spread, indent=2)) if args.json else _print_spread(spread, args.threads)
        return 0
    rows = [
        harness_vs_direct(name, dirs[name], text, args.threads, args.tokens, args.rounds)
        for name in [*VARIANTS, "hf"]
    ]
    walls = None if args.no_wall else evaluate_wall_times(dirs["hf"])
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    result = {
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "rows": rows,
        "speed_spread": spread,
        "wall_times": walls,
        "targets": {
            "harness_overhead<5%": bool(ratios) and min(ratios) >= 0.95,
            "default_recipe_on_3_profiles<5min": walls is None or walls["total_s"] < 300,
            "decode_spread<=10%": all(
                "spread" in r["after"] and r["after"]["spread"] <= 0.10 for r in spread
            ),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"decode tokens/s, {args.threads} threads, {args.tokens} tokens, 128-token prompt\n")
    print(
        f"{'runtime':18} {'variant':12} {'harness':>9} {'direct':>9} {'ratio':>6}  "
        f"{'TTFT ms':>8} {'load ms':>8} {'peak RSS':>9}"
    )
    for r in rows:
        if "ratio" not in r:
            print(f"{'?':18} {r['variant']:12} {r['status']}: {r['detail']}")
            continue
        print(
            f"{r['runtime']:18} {r['variant']:12} {r['harness_decode_tps']:9.1f} "
            f"{r['direct_decode_tps']:9.1f} {r['ratio']:6.3f}  {r['ttft_ms']:8.2f} "
            f"{r['load_ms']:8.1f} {r['peak_rss_mb']:7.1f}MB   rounds {r['ratios']}"
        )
    _print_spread(spread, args.threads)
    if walls:
        print(
            f"\nfull evaluation of the default recipe ({walls['variants']} variants) on "
            f"{', '.join(walls['profiles'])}: {walls['total_s']:.1f} s "
            f"(reference log-probs {walls['reference_s']:.1f} s)"
        )
        print(f"{'variant':28} {'quality':>8} {'perf (3 profiles)':>18}")
        for w in walls["rows"]:
            print(f"{w['variant']:28} {w['quality_s']:7.2f}s {w['perf_s']:17.2f}s")
    for name, ok in result["targets"].items():
        print(f"\n  target {name:30} {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
