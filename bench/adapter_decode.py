"""Decode speed of a base GGUF with and without a LoRA adapter in llama.cpp, side by side.

    python bench/adapter_decode.py BASE.gguf ADAPTER.gguf [--rounds 5] [--tokens 128]

Both runtimes are loaded once; rounds alternate (base, adapter, adapter, base, ...) after a
warm-up each, so a busy shared host slows both alike. Prints the median tokens/s of each and
their ratio (target: adapter >= 0.9x base), plus the load time with and without the adapter
(what switching adapters costs on a device besides the download).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from slmops.runtimes.llama_cpp import LlamaCppRuntime

PROMPT = "The store opens at nine and the first customers ask for"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    plain = LlamaCppRuntime(args.base, args.threads, 512)
    load_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora = LlamaCppRuntime(args.base, args.threads, 512, lora_path=args.adapter)
    load_lora = time.perf_counter() - t0
    ids = [plain.bos_id or 0, *plain.tokenize(PROMPT)]
    speeds: dict[str, list[float]] = {"base": [], "adapter": []}
    for rt in (plain, lora):  # warm-up
        rt.generate(ids, 16, stop_at_eos=False)
    for r in range(args.rounds):
        order = [("base", plain), ("adapter", lora)]
        for name, rt in order if r % 2 == 0 else order[::-1]:
            _, stats = rt.generate(ids, args.tokens, stop_at_eos=False)
            speeds[name].append(stats.decode_tokens_per_s)
    base, adapted = (statistics.median(speeds[k]) for k in ("base", "adapter"))
    print(f"base    {base:8.1f} tok/s  (rounds: {', '.join(f'{s:.0f}' for s in speeds['base'])})")
    print(
        f"adapter {adapted:8.1f} tok/s  (rounds: {', '.join(f'{s:.0f}' for s in speeds['adapter'])})"
    )
    print(f"adapter / base: {adapted / base:.3f}x (target >= 0.9x)")
    print(f"load: base {load_plain:.3f} s, base + adapter {load_lora:.3f} s")


if __name__ == "__main__":
    main()
