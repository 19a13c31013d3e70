"""A real model through the whole loop: Gemma 3 270M (Q4_K_M GGUF from PyPI packages).

    make bench-real            # fetches the packages with pip once, then runs this
    python bench/real_model.py [--work DIR] [--skip-fleet] [--repeats N] [--json]

Steps, each timed (wall, peak RSS of the process tree): assemble the GGUF from its packages;
`slmops import` it; `slmops model dequantize` a reference; `slmops optimize` the reference with a
requantization ladder (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K), ONNX int4 and structurally
pruned variants; `slmops evaluate` everything (the imported original included) on two device
profiles against the reference, on English text that ships with Debian (the GPL-3 text in
/usr/share/common-licenses, never seen by the recipe: calibration uses GPL-2); a second
evaluation to check that the pick per profile is stable; bundle, sign, push to a control plane,
roll out to one agent, send chat completions; and the agent endpoint's decode speed beside
llama.cpp called directly (bench/fleet.py decode). Prints the table and every target, met or not.

Speed: each perf repeat is a fresh child that decodes for >= 0.3 s (evaluate/perf.py),
--repeats rounds per variant x profile (3); the spread target is (max - min) / median over those
rounds, so more rounds steady the median but can only widen the range.

The reference is dequantized from the published Q4_K_M file, not the original bf16 weights: KLD
is measured against that, which the report and this table say.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "slmops.cli.main"]
EVAL_TEXT = Path("/usr/share/common-licenses/GPL-3")
CALIBRATION_TEXT = Path("/usr/share/common-licenses/GPL-2")
PROFILES = "rpi5-8gb,arm-gateway-2gb"
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
BUDGET_MINUTES = 25.0
COMPLETION_PROMPTS = (
    "The GNU General Public License is",
    "The capital of France is",
)


def recipe_text(calibration: Path) -> str:
    lines = ["name: gemma3-270m-ladder", "variants:"]
    for q in LADDER:
        lines += [
            f"  gguf-{q.lower()}:",
            "    - export-gguf: {outtype: f16}",
            f"    - quantize-gguf: {{type: {q}}}",
        ]
    lines += [
        "  onnx-int4:",
        "    - export-onnx: {precision: int4, block_size: 32, accuracy_level: 4}",
        "  ffn25-gguf-q4_k_m:",
        "    - prune-structured: {target: ffn, ratio: 0.25, round_to: 128}",
        "    - export-gguf: {outtype: f16}",
        "    - quantize-gguf: {type: Q4_K_M}",
        "  layers2-gguf-q4_k_m:",
        "    - prune-structured: {target: layers, ratio: 0.12, importance: activation, "
        f"calibration: {calibration}, samples: 8, seqlen: 128}}",
        "    - export-gguf: {outtype: f16}",
        "    - quantize-gguf: {type: Q4_K_M}",
    ]
    return "\n".join(lines) + "\n"


def run_measured(cmd: list[str], what: str, *, quiet: bool) -> tuple[Any, float, int]:
    """Run a CLI command with --json; its JSON, wall seconds and peak RSS of its process tree."""
    if not quiet:
        print(f"==> {what}: {' '.join(str(c) for c in cmd[3:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(
                c.memory_info().rss for c in ps.children(recursive=True)
            )
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return (json.loads(out) if out.strip() else None), wall, peak


def evaluate(
    work: Path, out: Path, reference: Path, quiet: bool, repeats: int = 3
) -> tuple[dict[str, Any], float]:
    cmd = [
        *CLI,
        "evaluate",
        str(work / "variants"),
        "--profiles",
        PROFILES,
        "--reference",
        str(reference),
        "--eval-text",
        str(EVAL_TEXT),
        "--out",
        str(out),
        "--windows",
        "12",
        "--window-tokens",
        "128",
        "--baseline-tokens",
        "16",
        "--repeats",
        str(repeats),
        "--json",
    ]
    _, wall, _ = run_measured(cmd, f"evaluate -> {out.name}", quiet=quiet)
    return json.loads((out / "report.json").read_text()), wall


def tensor_types(variant_dir: Path) -> dict[str, int] | None:
    """Tensor count per ggml type, as the card records what llama.cpp wrote (or imported)."""
    from slmops.model.card import read_card

    card = read_card(variant_dir)
    if card is None or card.format != "gguf":
        return None
    for step in reversed(card.chain):
        if "tensor_types" in step.report:
            return dict(step.report["tensor_types"])
    imported_only = all(step.kind == "import" for step in card.chain)
    return dict((card.origin or {}).get("tensor_types") or {}) if imported_only else None


def table(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for v in report["variants"]:
        q = report["quality"].get(v["name"], {})
        perfs = [p for p in report["perf"] if p["variant"] == v["name"]]
        host = next((p for p in perfs if p.get("decode_tps")), None)
        tps = (host or {}).get("decode_tps") or {}
        rows.append(
            {
                "variant": v["name"],
                "quantization": v.get("quantization"),
                "weights_mb": round(v["weights_bytes"] / 1e6, 1),
                "kld": q.get("kld_mean"),
                "top1": q.get("top1_agreement"),
                "perplexity": q.get("perplexity"),
                "decode_tps": tps.get("median"),
                "decode_tps_min": tps.get("min"),
                "decode_tps_max": tps.get("max"),
                "ttft_ms": ((host or {}).get("ttft_ms") or {}).get("median"),
                "peak_rss_mb": round(
                    (((host or {}).get("peak_rss_bytes") or {}).get("max") or 0) / 2**20, 1
                )
                or None,
                "profile": (host or {}).get("profile"),
                "unstable": (host or {}).get("unstable"),
                "decode_tokens_per_repeat": (host or {}).get("decode_tokens"),
                "cpu_share": (((host or {}).get("cpu_share") or {}).get("median")),
                "tensor_types": tensor_types(Path(v["path"])),
            }
        )
    return rows


def pass_memory(work: Path, fp32_bytes: int) -> list[dict[str, Any]]:
    """Per pass (first time it ran), RAM beyond the runtime baseline as a multiple of fp32."""
    from slmops.model.card import read_card

    seen: dict[str, dict[str, Any]] = {}
    for card_dir in sorted((work / "variants").iterdir()):
        card = read_card(card_dir) if card_dir.is_dir() else None
        for step in card.chain if card else []:
            if step.pass_name in ("import", "dequantize"):
                continue
            key = f"{step.pass_name} {json.dumps(step.config, sort_keys=True)}"
            extra = step.peak_rss_bytes - step.baseline_rss_bytes
            seen.setdefault(
                key,
                {
                    "pass": step.pass_name,
                    "config": step.config,
                    "wall_s": step.wall_time_s,
                    "peak_rss_mb": round(step.peak_rss_bytes / 2**20),
                    "beyond_baseline_x_fp32": round(extra / fp32_bytes, 2),
                },
            )
    return list(seen.values())


def fleet(work: Path, bundle: Path, keys: Path, quiet: bool) -> dict[str, Any]:
    """Push the signed bundle to a real control plane, roll it out to one agent, chat."""
    from slmops.bundle.registry import push
    from slmops.cli.demo_fleet import (
        AgentSpec,
        apply_and_wait,
        chat,
        devices_table,
        fleet_processes,
        start_agents,
        start_server,
    )

    root = work / "fleet"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    name, version = _bundle_name(bundle)
    t0 = time.perf_counter()
    with fleet_processes(root, keep_running=False) as f:
        start_server(f)
        push(bundle, f"oci://{f.url.removeprefix('http://')}/{name}:{version}", token=f.admin)
        f.agents = (AgentSpec("gemma-box-1", "rpi5-8gb", 2048, "lab"),)
        start_agents(f, keys / "slmops.pub", f.agents, {"fleet": "demo"})
        rollout = apply_and_wait(f, name, version, True)
        devices = devices_table(f)
        answers = []
        # Gemma 3 270M is the pretrained model: it continues text rather than chats, so the
        # useful call is a completion (a chat through the fallback template is shown too).
        port = f.agent_ports["gemma-box-1"]
        for prompt in COMPLETION_PROMPTS:
            t1 = time.perf_counter()
            body = {"model": "default", "prompt": prompt, "max_tokens": 32, "temperature": 0}
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
            r.raise_for_status()
            doc = r.json()
            answers.append(
                {
                    "seconds": round(time.perf_counter() - t1, 2),
                    "prompt": prompt,
                    "text": doc["choices"][0]["text"],
                    "usage": doc.get("usage"),
                }
            )
        t1 = time.perf_counter()
        answer = chat(f, "gemma-box-1")
        answers.append(
            {
                "seconds": round(time.perf_counter() - t1, 2),
                "prompt": "(chat) Return the list of",
                "text": answer["choices"][0]["message"]["content"],
                "usage": answer.get("usage"),
            }
        )
    return {
        "rollout": rollout.get("status"),
        "devices": devices,
        "chat": answers,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _bundle_name(bundle: Path) -> tuple[str, str]:
    from slmops.bundle.inspect import inspect_bundle

    info = inspect_bundle(bundle)
    return str(info["name"]), str(info["version"])


def endpoint_decode(variant: Path, quiet: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "fleet.py"),
        "--skip",
        "checkins,rss",
        "--variant",
        str(variant),
        "--tokens",
        "96",
        "--rounds",
        "4",
        "--json",
    ]
    if not quiet:
        print("==> agent endpoint vs llama.cpp direct", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out)["decode"])


HOST_KERNEL = """
import time, numpy as np
a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
for _ in range(50): a @ a
t = time.perf_counter()
for _ in range(400): a @ a
print(400 / (time.perf_counter() - t))
"""


def host_floor(processes: int = 8) -> dict[str, Any]:
    """How steady this host's own speed is: one fixed float32 matmul kernel (two BLAS threads,
    as llama.cpp decodes with two threads), timed in fresh processes one after another, with
    the spread statistic of the tok/s target ((max - min) / median). A speed figure taken in
    fresh processes cannot be steadier than the host under it."""
    rates = []
    for _ in range(processes):
        out = subprocess.run(
            [sys.executable, "-c", HOST_KERNEL], capture_output=True, text=True, check=True
        )
        rates.append(float(out.stdout.strip()))
    rates.sort()
    median = statistics.median(rates)
    return {
        "processes": processes,
        "matmuls_per_s": [round(r) for r in rates],
        "spread": round((rates[-1] - rates[0]) / median, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "slmops" / "bench-real")
    ap.add_argument("--skip-fleet", action="store_true")
    ap.add_argument("--skip-second-eval", action="store_true")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="perf rounds per variant x profile (each a fresh child); "
        "more rounds steady the median but widen (max - min) / median, the spread target",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    quiet = args.json
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from slmops.model.packaged import GEMMA3_270M, find_packaged_gguf

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    gguf = find_packaged_gguf(GEMMA3_270M)
    steps["assemble"] = {"wall_s": round(time.perf_counter() - t0, 1)}

    imported = work / "variants" / "original-q4_k_m"
    if not imported.exists():
        _, wall, peak = run_measured(
            [*CLI, "import", str(gguf), "--out", str(imported), "--json"], "import", quiet=quiet
        )
        steps["import"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20)}
    reference = work / "reference"
    if not reference.exists():
        _doc, wall, peak = run_measured(
            [*CLI, "model", "dequantize", str(gguf), "--out", str(reference), "--json"],
            "dequantize",
            quiet=quiet,
        )
        steps["dequantize"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20)}
    recipe = work / "recipe.yaml"
    recipe.write_text(recipe_text(CALIBRATION_TEXT))
    run, wall, peak = run_measured(
        [
            *CLI,
            "optimize",
            str(reference),
            "--recipe",
            str(recipe),
            "--out",
            str(work / "variants"),
            "--json",
        ],
        "optimize",
        quiet=quiet,
    )
    steps["optimize"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20)}
    fp32 = int(run["fp32_bytes"])

    floor_before = host_floor()
    report, wall = evaluate(work, work / "report", reference, quiet, args.repeats)
    steps["evaluate"] = {"wall_s": round(wall, 1)}
    loop_minutes = (time.perf_counter() - t_all) / 60
    picks = {s["profile"]: s.get("variant") for s in report["selections"]}
    second_picks = None
    if not args.skip_second_eval:
        report2, wall2 = evaluate(work, work / "report-2", reference, quiet, args.repeats)
        steps["evaluate_again"] = {"wall_s": round(wall2, 1)}
        second_picks = {s["profile"]: s.get("variant") for s in report2["selections"]}

    floor_after = host_floor()
    rows = table(report)
    spreads = [
        (r["decode_tps_max"] - r["decode_tps_min"]) / r["decode_tps"]
        for r in rows
        if r["decode_tps"] and r["decode_tps_min"] is not None and r["decode_tps_max"] is not None
    ]
    memory = pass_memory(work, fp32)
    result: dict[str, Any] = {
        "model": {"file": str(gguf), "sha256": GEMMA3_270M.sha256, "fp32_bytes": fp32},
        "reference_note": report["reference"].get("note"),
        "steps": steps,
        "variants": rows,
        "picks": picks,
        "picks_second_run": second_picks,
        "pass_memory": memory,
        "loop_minutes": round(loop_minutes, 1),
        "host_floor": {"before": floor_before, "after": floor_after},
    }

    bundle = work / "bundle"
    keys = work / "keys"
    if not (keys / "slmops.key").exists():
        run_measured([*CLI, "keys", "init", "--out", str(keys), "--json"], "keys", quiet=quiet)
    if not bundle.exists():
        run_measured(
            [
                *CLI,
                "bundle",
                str(work / "variants"),
                "--report",
                str(work / "report"),
                "--name",
                "gemma-3-270m",
                "--version",
                "1.0.0",
                "--out",
                str(bundle),
                "--json",
            ],
            "bundle",
            quiet=quiet,
        )
        run_measured(
            [*CLI, "sign", str(bundle), "--key", str(keys / "slmops.key"), "--json"],
            "sign",
            quiet=quiet,
        )
    if not args.skip_fleet:
        result["fleet"] = fleet(work, bundle, keys, quiet)
    result["endpoint"] = endpoint_decode(imported, quiet)

    klds = {r["variant"]: r["kld"] for r in rows if r["kld"] is not None}
    ladder = [f"gguf-{q.lower()}" for q in LADDER]
    source = str(report["reference"].get("source_quantization") or "").lower()
    ladder_wo_source = [v for v in ladder if v != f"gguf-{source}"]
    targets = {
        "families_note": "architectures: see tests/optimize/test_architectures.py",
        f"whole loop (import, recipe, evaluation) <= {BUDGET_MINUTES:g} min": loop_minutes
        <= BUDGET_MINUTES,
        "every pass <= 2x fp32 beyond baseline": all(
            m["beyond_baseline_x_fp32"] <= 2.0 for m in memory
        ),
        "agent endpoint decode >= 0.97x llama.cpp direct": result["endpoint"]["streamed_ratio"]
        >= 0.97,
        "same pick per profile in two runs": second_picks is None or picks == second_picks,
        "tok/s spread <= 10%": bool(spreads) and max(spreads) <= 0.10,
        # The reference is dequantized from Q4_K_M, so requantizing to Q4_K_M lands on the
        # file's own grid; the rest of the ladder must still order by precision, and the
        # report must say why Q4_K_M is out of line.
        "KLD rises down the ladder, the source's own type aside (Q8_0 < Q6_K < Q5_K_M < "
        "Q3_K_M < Q2_K)": all(
            klds.get(a, 0) <= klds.get(b, 0) for a, b in itertools.pairwise(ladder_wo_source)
        ),
        "the report explains the reference (dequantized, source grid)": "own grid"
        in (report["reference"].get("note") or ""),
    }
    if "fleet" in result:
        targets["rollout to an agent succeeded"] = result["fleet"]["rollout"] == "succeeded"
    result["targets"] = targets
    result["max_spread"] = round(max(spreads), 3) if spreads else None
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        show(result)
    return 0


def show(r: dict[str, Any]) -> None:
    print(f"\nGemma 3 270M ({r['model']['file']}); {r['reference_note'] or ''}")
    print("\nsteps: " + ", ".join(f"{k} {v['wall_s']} s" for k, v in r["steps"].items()))
    head = f"{'variant':22} {'quant':8} {'MB':>7} {'KLD':>7} {'top1':>6} {'ppl':>8} "
    head += f"{'tok/s (min-max)':>20} {'TTFT ms':>8} {'RSS MB':>7}"
    print("\n" + head)
    for v in r["variants"]:
        tps = (
            f"{v['decode_tps']:.1f} ({v['decode_tps_min']:.1f}-{v['decode_tps_max']:.1f})"
            if v["decode_tps"]
            else "-"
        )

        def f(x: Any, fmt: str) -> str:
            return format(x, fmt) if isinstance(x, int | float) else "-"

        print(
            f"{v['variant']:22} {v['quantization'] or '-':8} {v['weights_mb']:>7} "
            f"{f(v['kld'], '.4f'):>7} {f(v['top1'], '.3f'):>6} {f(v['perplexity'], '.2f'):>8} "
            f"{tps:>20} {f(v['ttft_ms'], '.0f'):>8} {f(v['peak_rss_mb'], '.0f'):>7}"
        )
    print("\ntensor types per variant (count per ggml type, as written):")
    for v in r["variants"]:
        if v.get("tensor_types"):
            print(
                f"  {v['variant']:22} "
                + ", ".join(f"{k} x{n}" for k, n in v["tensor_types"].items())
            )
    print(f"\npicks: {r['picks']}  (second run: {r['picks_second_run']})")
    print("\npass memory (beyond baseline, x fp32):")
    for m in r["pass_memory"]:
        print(f"  {m['pass']:18} {m['beyond_baseline_x_fp32']:>5}x  peak {m['peak_rss_mb']} MB")
    if "fleet" in r:
        fl = r["fleet"]
        print(f"\nfleet: rollout {fl['rollout']}; chat answers:")
        for a in fl["chat"]:
            print(f"  {a['seconds']} s: {a['prompt']!r} -> {a['text'][:100]!r}")
    e = r["endpoint"]
    print(
        f"\nendpoint {e['endpoint_decode_tps']} tok/s vs direct {e['direct_decode_tps']} "
        f"(ratio {e['streamed_ratio']})"
    )
    hf = r["host_floor"]
    print(
        f"\nhost floor: a fixed matmul kernel in {hf['before']['processes']} fresh processes "
        f"spread {100 * hf['before']['spread']:.1f} % before the evaluation and "
        f"{100 * hf['after']['spread']:.1f} % after it; the variants' tok/s spread at most "
        f"{100 * (r['max_spread'] or 0):.1f} %"
    )
    print("\ntargets:")
    for k, v in r["targets"].items():
        if isinstance(v, bool):
            print(f"  [{'met' if v else 'MISSED'}] {k}")


if __name__ == "__main__":
    raise SystemExit(main())
