"""Benchmark the optimize stage on the demo model and the default recipe.

Prints, side by side in one run: each pass's wall time, peak RSS and output size; each variant's
size ratio to the fp32 model; the re-run time against the first run (the cache); and each pass's
memory above its runtime baseline as a multiple of the fp32 model size.

Targets (issue 2): Q4_K_M <= 0.3x fp32; cached re-run < 5% of the first run; no pass holds more
than ~2x the fp32 model beyond the runtime's own baseline.

    .venv/bin/python bench/optimize.py [--model DIR] [--minutes 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from slmops.cli.optimize import default_recipe_path
from slmops.model.demo import train_demo_model
from slmops.optimize.engine import run_recipe
from slmops.optimize.recipe import load_recipe


def mb(n: float) -> str:
    return f"{n / 1e6:8.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, help="HF model folder (default: the demo model)")
    ap.add_argument(
        "--minutes", type=float, default=3.0, help="demo model budget when --model is not given"
    )
    ap.add_argument("--recipe", type=Path, default=default_recipe_path())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slmops-bench-opt-"))
    model = args.model or train_demo_model(work / "model", minutes=args.minutes).path
    recipe = load_recipe(args.recipe)
    t0 = time.perf_counter()
    first = run_recipe(model, recipe, work / "variants")
    first_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    again = run_recipe(model, recipe, work / "variants")
    rerun_s = time.perf_counter() - t1

    fp32 = first.fp32_bytes
    steps = {}
    for v in first.variants:
        for s in v.steps:
            if not s.cached:
                steps[s.key] = s
    result = {
        "model": str(model),
        "fp32_bytes": fp32,
        "first_run_s": round(first_s, 2),
        "rerun_s": round(rerun_s, 3),
        "rerun_ratio": round(rerun_s / first_s, 4),
        "rerun_all_cached": all(v.cached for v in again.variants),
        "steps": [
            {
                "variant": s.variant,
                "pass": s.pass_name,
                "wall_time_s": round(s.wall_time_s, 2),
                "peak_rss_bytes": s.peak_rss_bytes,
                "baseline_rss_bytes": s.baseline_rss_bytes,
                "above_baseline_x_fp32": round((s.peak_rss_bytes - s.baseline_rss_bytes) / fp32, 2),
                "output_bytes": s.output_bytes,
            }
            for s in steps.values()
        ],
        "variants": [
            {
                "name": v.name,
                "weights_bytes": v.weights_bytes,
                "ratio_to_fp32": round(v.ratio_to_fp32, 4),
            }
            for v in first.variants
        ],
    }
    q4 = next((v for v in first.variants if "q4_k_m" in v.name and "ffn" not in v.name), None)
    worst_mem = max(s["above_baseline_x_fp32"] for s in result["steps"])
    result["targets"] = {
        "q4_k_m_ratio<=0.3": bool(q4 and q4.ratio_to_fp32 <= 0.3),
        "rerun<5%": result["rerun_ratio"] < 0.05,
        "memory_above_baseline<=2x_fp32": worst_mem <= 2.0,
    }
    shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {model}  fp32 size {mb(fp32)}\n")
    print(
        f"{'pass (first variant that ran it)':44} {'wall':>8} {'peak RSS':>11} {'baseline':>11} {'above/fp32':>10} {'output':>11}"
    )
    for s in result["steps"]:
        print(
            f"{s['variant'] + ' / ' + s['pass']:44} {s['wall_time_s']:7.2f}s {mb(s['peak_rss_bytes'])} "
            f"{mb(s['baseline_rss_bytes'])} {s['above_baseline_x_fp32']:9.2f}x {mb(s['output_bytes'])}"
        )
    print(f"\n{'variant':28} {'weights':>11} {'x fp32':>8}")
    for v in result["variants"]:
        print(f"{v['name']:28} {mb(v['weights_bytes'])} {v['ratio_to_fp32']:8.3f}")
    print(
        f"\nfirst run {first_s:.1f} s, re-run {rerun_s:.3f} s: ratio {result['rerun_ratio']:.4f} "
        f"(all cached: {result['rerun_all_cached']})"
    )
    print(f"worst pass memory above its baseline: {worst_mem:.2f}x the fp32 model")
    for name, ok in result["targets"].items():
        print(f"  target {name:34} {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
