"""Benchmark the fleet pieces that exist so far, side by side in one run.

Measured now: the agent's OpenAI-compatible endpoint decode tokens/s (streamed over HTTP from a
separate process, timed at the client from the first to the last token) against llama.cpp called
directly through the runtime seam on the same GGUF and thread count. Target: >= 0.95x.

Not measured yet (the control plane and the agent daemon are still being built, issue 5):
device check-ins per second against the server on SQLite/PostgreSQL beside a bare FastAPI
endpoint, and the agent's idle RSS. This script says so rather than printing made-up numbers.

    .venv/bin/python bench/fleet.py [--variant DIR] [--threads 2] [--tokens 128] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from slmops.runtimes import open_runtime

PROMPT = "Return the list of"
SERVER = textwrap.dedent(
    """
    import sys, time
    from slmops.agent.openai_api import Served, serve_in_thread
    from slmops.protocol.device import GenerationDefaults
    from slmops.runtimes import open_runtime
    rt = open_runtime(sys.argv[1], threads=int(sys.argv[2]), n_ctx=512)
    srv, t = serve_in_thread(lambda: Served(rt, "bench", GenerationDefaults()))
    print(srv.server_address[1], flush=True)
    t.join()
    """
)


def default_variant() -> Path:
    from slmops.cli.optimize import default_recipe_path
    from slmops.model.demo import train_demo_model
    from slmops.optimize.engine import run_recipe
    from slmops.optimize.recipe import load_recipe

    cache = Path.home() / ".cache" / "slmops"
    model = train_demo_model(cache / "bench-evaluate" / "model").path
    run = run_recipe(
        model, load_recipe(default_recipe_path()), cache / "bench-variants", only=["gguf-q4_k_m"]
    )
    return run.variants[0].path


def endpoint_tps(port: int, tokens: int) -> tuple[float, int]:
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    stamps = []
    with httpx.stream(
        "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    n = len(stamps)
    return ((n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0), n


def endpoint_blocking_tps(port: int, tokens: int) -> float:
    """Non-streaming request: tokens / wall time (prompt included, so a slight underestimate)."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
    elapsed = time.perf_counter() - t0
    return int(r.json()["usage"]["completion_tokens"]) / elapsed


def direct_tps(variant: Path, threads: int, tokens: int) -> tuple[float, int]:
    rt = open_runtime(variant, threads=threads, n_ctx=512)
    ids = ([rt.bos_id] if rt.bos_id is not None else []) + rt.tokenize(PROMPT)
    rt.generate(ids, 8)  # warm-up, as the server's first request warms it
    out, stats = rt.generate(ids, tokens)
    rt.close()
    return stats.decode_tokens_per_s, len(out)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--variant", type=Path, help="a GGUF variant folder (default: the demo's gguf-q4_k_m)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    variant = args.variant or default_variant()

    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(variant), str(args.threads)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        endpoint_tps(port, 8)  # warm-up
        ratios, api, direct, blocking = [], [], [], []
        for _ in range(args.rounds):
            d, nd = direct_tps(variant, args.threads, args.tokens)
            e, ne = endpoint_tps(port, args.tokens)
            blocking.append(endpoint_blocking_tps(port, args.tokens))
            direct.append(d)
            api.append(e)
            ratios.append(e / d if d else 0.0)
    finally:
        proc.kill()
        proc.wait()
    result = {
        "variant": str(variant),
        "threads": args.threads,
        "tokens": args.tokens,
        "endpoint_decode_tps": round(statistics.median(api), 1),
        "direct_decode_tps": round(statistics.median(direct), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "endpoint_blocking_tps": round(statistics.median(blocking), 1),
        "blocking_ratio": round(statistics.median(blocking) / statistics.median(direct), 3),
        "tokens_generated": {"endpoint": ne, "direct": nd},
        "not_measured_yet": ["check-ins/s vs bare FastAPI (SQLite, PostgreSQL)", "agent idle RSS"],
        "targets": {"endpoint_decode>=0.95x_direct": statistics.median(ratios) >= 0.95},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"variant {variant}, {args.threads} threads, up to {args.tokens} tokens, greedy\n")
    print(f"{'path':34} {'decode tok/s':>12}")
    print(f"{'llama.cpp direct (runtime seam)':34} {result['direct_decode_tps']:12.1f}")
    print(f"{'agent OpenAI endpoint (SSE, HTTP)':34} {result['endpoint_decode_tps']:12.1f}")
    print(f"{'agent OpenAI endpoint, not streamed':34} {result['endpoint_blocking_tps']:12.1f}")
    print(
        f"\nratio endpoint/direct {result['ratio']:.3f} streamed (rounds {result['ratios']}), "
        f"{result['blocking_ratio']:.3f} not streamed"
    )
    print(
        "  (on 2 cores the streaming client and the HTTP server compete with llama.cpp's 2 threads)"
    )
    print(
        f"  target endpoint_decode>=0.95x_direct  {'met' if result['targets']['endpoint_decode>=0.95x_direct'] else 'MISSED'}"
    )
    print("\nnot measured yet: " + "; ".join(result["not_measured_yet"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
