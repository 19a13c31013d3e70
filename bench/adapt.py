"""Benchmark distillation and per-site adapters on the demo model, side by side in one run.

Distillation: the demo model (cached under ~/.cache/slmops) is pruned by prune-structured (33 %
of every FFN, rounded to 256 like the default recipe) and the distill pass trains the pruned
model on the original's logits for --distill-minutes (target: <= 5 minutes on 2 cores). Printed:
the pruned variant's KLD gap to the original and the fraction distillation won back (target:
>= 50 %), on the pass's own held-out windows of calibration text and, independently, on the demo
model's held-out split (text neither pruning nor distillation saw).

Adapters: `slmops adapt` trains a LoRA adapter on a "site" corpus the demo model never trained
on (the Python language reference topics shipped as pydoc_data in every Python install) for
--adapt-minutes. Printed: site perplexity on its held-out split, base vs adapted (target: >= 20 %
better), the KLD to the base on general text (forgetting), and the adapter's size.

The machine may be shared: the wall times and step counts depend on what else runs; the step
counts are printed so the figures can be read against the budget.

    .venv/bin/python bench/adapt.py [--threads 2] [--distill-minutes 5] [--adapt-minutes 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slmops.model.demo import train_demo_model
from slmops.model.handle import open_model

CACHE = Path.home() / ".cache" / "slmops"
WORK = CACHE / "bench-adapt"


def _pass(name: str, options: dict[str, Any], src: Path, out: Path) -> dict[str, Any]:
    """Run a pass in the engine's worker process, which measures its peak and baseline RSS."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec, res = WORK / "spec.json", WORK / "result.json"
    spec.write_text(
        json.dumps({"pass": name, "options": options, "input": str(src), "output": str(out)})
    )
    subprocess.run(
        [sys.executable, "-m", "slmops.optimize.worker", str(spec), str(res)], check=True
    )
    result = json.loads(res.read_text())
    if not result["ok"]:
        raise SystemExit(f"{name} failed: {result['error']}")
    return {
        **result["result"]["report"],
        "peak_rss_bytes": result["peak_rss_bytes"],
        "baseline_rss_bytes": result["baseline_rss_bytes"],
    }


def heldout_kld(teacher: Path, students: list[Path], text: str, windows: int = 16) -> list[float]:
    """KL(teacher || student) per token, full vocabulary, on windows of the demo's held-out text."""
    import torch
    from transformers import AutoTokenizer

    from slmops.model.hf import load_causal_lm

    tok = AutoTokenizer.from_pretrained(teacher)
    tok.model_max_length = 1 << 30
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    w = ids[: windows * 128].reshape(-1, 128)
    with torch.no_grad():
        p = torch.log_softmax(load_causal_lm(teacher)(input_ids=w).logits, -1)
        out = []
        for s in students:
            q = torch.log_softmax(load_causal_lm(s)(input_ids=w).logits, -1)
            out.append(float((p.exp() * (p - q)).sum(-1).mean()))
    return out


def bench_distill(model: Path, minutes: float, threads: int) -> dict[str, Any]:
    pruned, distilled = WORK / "ffn33", WORK / "ffn33-distilled"
    _pass("prune-structured", {"target": "ffn", "ratio": 0.33, "round_to": 256}, model, pruned)
    opts = {
        "teacher": str(model),
        "steps": None,
        "minutes": minutes,
        "windows": 512,
        "threads": threads,
        "lr": float(os.environ.get("BENCH_DISTILL_LR", "3e-5")),
        "cache_dir": str(WORK / "teacher-cache"),
    }
    t0 = time.perf_counter()
    rep = _pass("distill", opts, pruned, distilled)
    wall = time.perf_counter() - t0
    held = (model / "heldout.txt").read_text()
    k_pruned, k_dist = heldout_kld(model, [pruned, distilled], held)
    return {
        "budget_minutes": minutes,
        "threads": threads,
        "steps": rep["steps"],
        "wall_seconds": round(wall, 1),
        "teacher_logits": rep["teacher_logits"],
        "calibration_kld_pruned": rep["kld_before"],
        "calibration_kld_distilled": rep["kld_after"],
        "calibration_recovered": rep["kld_recovered"],
        "heldout_kld_pruned": round(k_pruned, 5),
        "heldout_kld_distilled": round(k_dist, 5),
        "heldout_recovered": round(1 - k_dist / k_pruned, 4),
        "target_recovered": 0.5,
        "student_fp32_bytes": rep["student_fp32_bytes"],
        "peak_rss_above_baseline_bytes": rep["peak_rss_bytes"] - rep["baseline_rss_bytes"],
    }


def site_corpus(path: Path) -> Path:
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return path


def bench_adapter(model: Path, minutes: float, threads: int) -> dict[str, Any]:
    from slmops.adapt.run import adapt
    from slmops.adapt.train import TrainOptions

    data = site_corpus(WORK / "site-language-reference.txt")
    lr = float(os.environ.get("BENCH_ADAPT_LR", "1e-3"))
    opts = TrainOptions(steps=None, minutes=minutes, threads=threads, lr=lr, rank=8)
    res = adapt(model, data, WORK / "adapter", opts)
    ev = res.evaluation
    return {
        "budget_minutes": minutes,
        "threads": threads,
        "steps": res.training["steps"],
        "trainable_parameters": res.training["trainable_parameters"],
        "site_perplexity_base": ev["site_perplexity_base"],
        "site_perplexity_adapted": ev["site_perplexity_adapted"],
        "site_improvement": ev["site_perplexity_improvement"],
        "target_improvement": 0.2,
        "general_kld_to_base": ev["general_kld_to_base"],
        "adapter_gguf_bytes": ev["gguf_adapter_bytes"],
        "base_bytes": open_model(model).size_bytes,
        "decode": adapter_decode(model, WORK / "adapter" / "adapter.gguf"),
    }


def adapter_decode(model: Path, adapter: Path) -> dict[str, Any]:
    """Decode with the adapter vs the same Q8_0 base without it (llama.cpp, rounds alternating):
    what a device serving base + adapter gives up."""
    from adapter_decode import measure
    from slmops.optimize.passes.base import build_pass

    base_dir = WORK / "base-q8_0"
    if not list(base_dir.glob("*.gguf")):
        f16 = WORK / "base-f16"
        for name, opts, src, dst in (
            ("export-gguf", {"outtype": "f16"}, model, f16),
            ("quantize-gguf", {"type": "Q8_0"}, f16, base_dir),
        ):
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)
            p = build_pass(name, opts)
            p.prepare()
            p.run(open_model(src), dst)
    gguf = next(base_dir.glob("*.gguf"))
    # one thread: llama.cpp threads waiting on each other swing several-fold on a shared host
    m = measure(gguf, adapter, rounds=9, tokens=128, threads=1)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distill-minutes", type=float, default=5.0)
    ap.add_argument("--adapt-minutes", type=float, default=3.0)
    ap.add_argument("--skip-distill", action="store_true")
    ap.add_argument("--skip-adapt", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    WORK.mkdir(parents=True, exist_ok=True)
    model = train_demo_model(WORK / "model").path
    out: dict[str, Any] = {"load_average": os.getloadavg()}
    if not args.skip_distill:
        out["distill"] = bench_distill(model, args.distill_minutes, args.threads)
    if not args.skip_adapt:
        out["adapter"] = bench_adapter(model, args.adapt_minutes, args.threads)
    out["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if d := out.get("distill"):
        print(f"distill ({d['steps']} steps, {d['wall_seconds']} s, {d['threads']} threads)")
        print(
            f"  KLD to original, calibration held-out: pruned {d['calibration_kld_pruned']:.4f}"
            f" -> distilled {d['calibration_kld_distilled']:.4f}: recovered "
            f"{d['calibration_recovered']:.0%} (target >= 50 %)"
        )
        print(
            f"  KLD to original, demo held-out split:  pruned {d['heldout_kld_pruned']:.4f}"
            f" -> distilled {d['heldout_kld_distilled']:.4f}: recovered "
            f"{d['heldout_recovered']:.0%}"
        )
        print(
            f"  memory: peak RSS {d['peak_rss_above_baseline_bytes'] / 1e6:.0f} MB above the "
            f"runtime baseline, fp32 student {d['student_fp32_bytes'] / 1e6:.0f} MB"
        )
    if a := out.get("adapter"):
        print(f"adapter ({a['steps']} steps, {a['threads']} threads, {a['budget_minutes']} min)")
        print(
            f"  site perplexity: base {a['site_perplexity_base']:.1f} -> adapted "
            f"{a['site_perplexity_adapted']:.1f}: {a['site_improvement']:.0%} better "
            "(target >= 20 %)"
        )
        print(f"  general-text KLD to base {a['general_kld_to_base']:.4f} (forgetting)")
        print(
            f"  adapter.gguf {a['adapter_gguf_bytes'] / 1e6:.2f} MB vs base "
            f"{a['base_bytes'] / 1e6:.1f} MB"
        )
        dec = a["decode"]
        print(
            f"  decode with the adapter {dec['adapter_tps']:.0f} vs {dec['base_tps']:.0f} tok/s "
            f"without (Q8_0 base, llama.cpp, 1 thread, 9 alternating rounds): {dec['ratio']:.2f}x "
            f"(target >= 0.9x); loading base + adapter {dec['load_with_adapter_s']:.2f} s vs "
            f"{dec['load_base_s']:.2f} s"
        )
    print(f"load average before/after: {out['load_average']} / {out['load_average_after']}")


if __name__ == "__main__":
    main()
