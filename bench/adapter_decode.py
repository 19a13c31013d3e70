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


def measure(
    base: Path, adapter: Path, *, rounds: int = 5, tokens: int = 128, threads: int = 2
) -> dict[str, float | list[float]]:
    """Median decode tok/s of ``base`` alone and with ``adapter``, rounds alternating."""
    t0 = time.perf_counter()
    plain = LlamaCppRuntime(base, threads, 512)
    load_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora = LlamaCppRuntime(base, threads, 512, lora_path=adapter)
    load_lora = time.perf_counter() - t0
    ids = [plain.bos_id or 0, *plain.tokenize(PROMPT)]
    speeds: dict[str, list[float]] = {"base": [], "adapter": []}
    for rt in (plain, lora):  # warm-up
        rt.generate(ids, 16, stop_at_eos=False)
    for r in range(rounds):
        order = [("base", plain), ("adapter", lora)]
        for name, rt in order if r % 2 == 0 else order[::-1]:
            _, stats = rt.generate(ids, tokens, stop_at_eos=False)
            speeds[name].append(stats.decode_tokens_per_s)
    base_tps, adapted = (statistics.median(speeds[k]) for k in ("base", "adapter"))
    return {
        "base_tps": base_tps,
        "adapter_tps": adapted,
        "ratio": adapted / base_tps,
        "base_rounds": speeds["base"],
        "adapter_rounds": speeds["adapter"],
        "load_base_s": load_plain,
        "load_with_adapter_s": load_lora,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    m = measure(
        args.base, args.adapter, rounds=args.rounds, tokens=args.tokens, threads=args.threads
    )
    rounds = {k: ", ".join(f"{s:.0f}" for s in m[f"{k}_rounds"]) for k in ("base", "adapter")}  # type: ignore[union-attr]
    print(f"base    {m['base_tps']:8.1f} tok/s  (rounds: {rounds['base']})")
    print(f"adapter {m['adapter_tps']:8.1f} tok/s  (rounds: {rounds['adapter']})")
    print(f"adapter / base: {m['ratio']:.3f}x (target >= 0.9x)")
    print(f"load: base {m['load_base_s']:.3f} s, base + adapter {m['load_with_adapter_s']:.3f} s")


if __name__ == "__main__":
    main()
