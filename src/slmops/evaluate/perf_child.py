"""The measuring process: `python -m slmops.evaluate.perf_child SPEC.json RESULT.json`.

It runs in its own process so that the parent can pin it (CPU affinity, set before exec), watch
its RSS against the device's memory ceiling and kill it, and so that one variant's allocator
state or native crash never leaks into the next measurement.

The model is loaded once (timed), warmed up with one untimed generation of the full length, then
timed `repeats` times. One timed repeat is as many generations of `max_tokens` as it takes to
decode for at least `min_decode_s` seconds and `min_decode_tokens` tokens (the tokens and times
are summed, TTFT is the median of its generations): a 64-token generation of a 7 M-parameter
model lasts ~30 ms, about ten scheduler time slices, so one preemption by another process moved a
single-generation figure by 10-50 %; summed over >= 0.3 s the same preemption costs a few
percent. `min_decode_tokens` adds a floor in tokens (off by default: see evaluate/perf.py for
why a 256-token floor was dropped).
Decode time never includes prompt processing: it starts when the first token is out (TTFT).

Why a warm-up after every load: a device loads once and then serves many requests, so
steady-state TTFT and decode rate are the figures that matter; and a runtime's first pass
through each sequence length pays one-off allocations (ONNX Runtime GenAI reads ~3% slower on a
fresh load even after a short warm-up), so cold repeats would bias every median low. When
perf.measure_interleaved takes one repeat per child (one round), each child loads and warms up
again, so the load time gets one figure per round; the interpreter and runtime imports stay
outside it (imported before timing, as an agent that is already running would).

The child always writes a result (status ok or error with the message) and then leaves with
os._exit, so runtime teardown at interpreter exit cannot turn a good measurement into a crash.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.core.process import die_with_parent
from slmops.core.resources import own_peak_rss_bytes

if TYPE_CHECKING:
    from slmops.runtimes.base import Runtime

TOKEN_FLOOR_MAX_S = 8.0
"""The token floor stops applying after this many decode seconds in a repeat: a slow or starved
model has averaged enough by then, and its child must stay inside the harness's timeout (Gemma 3
270M decoded 2 tok/s on this box at load 15: 5 generations of 64 would take ~160 s per repeat)."""

# the runtime library each format loads; imported before timing so load time is the model's
_RUNTIME_MODULES = {"gguf": "llama_cpp", "onnx-genai": "onnxruntime_genai", "hf": "transformers"}


def build_prompt(rt: Runtime, text: str, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` ids: BOS (when the model has one) then `text`'s tokens, repeated.

    Tokenized by the runtime under test, so every variant sees a prompt of the same length in
    its own vocabulary; BOS is added by hand because ONNX GenAI's tokenizer does not add it.
    """
    toks = rt.tokenize(text)
    if not toks:
        raise ValueError("the prompt text tokenizes to nothing")
    head = [rt.bos_id] if rt.bos_id is not None else []
    body_len = max(0, n_tokens - len(head))
    body = (toks * (body_len // len(toks) + 1))[:body_len]
    return head + body


def measure_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up and time the generations `spec` asks for; numbers as lists for the parent."""
    import importlib

    from slmops.model.handle import detect_format
    from slmops.runtimes.base import runtime_for

    path = Path(spec["variant_dir"])
    cls = runtime_for(path)
    importlib.import_module(_RUNTIME_MODULES[detect_format(path).value])
    threads, n_ctx = int(spec["threads"]), int(spec["n_ctx"])
    max_tokens = int(spec["max_tokens"])
    out: dict[str, Any] = {"runtime": cls.name, "threads": threads, "n_ctx": n_ctx}
    out["max_tokens"] = max_tokens
    rt = cls(path, threads, n_ctx)
    try:
        ids = build_prompt(rt, spec["text"], int(spec["prompt_tokens"]))
        rt.generate(ids, max_tokens, stop_at_eos=False)  # warm-up, untimed
        floor_s = float(spec.get("min_decode_s", 0))
        floor_tokens = int(spec.get("min_decode_tokens", 0))
        repeats = [
            timed_repeat(rt, ids, max_tokens, floor_s, floor_tokens)
            for _ in range(int(spec["repeats"]))
        ]
        out["os_threads"] = _thread_count()
    finally:
        rt.close()
    out["prompt_tokens"] = len(ids)
    out["load_s"] = [rt.load_time_s]
    for key in ("ttft_s", "decode_tps", "generated", "decode_tokens", "runs", "cpu_share"):
        out[key] = [r[key] for r in repeats]
    # process-lifetime peak (load transients included), the figure a memory ceiling must cover
    out["rss"] = [float(own_peak_rss_bytes())]
    return out


def timed_repeat(
    rt: Runtime,
    ids: list[int],
    max_tokens: int,
    min_decode_s: float,
    min_decode_tokens: int = 0,
    max_runs: int = 1000,
) -> dict[str, Any]:
    """One timed repeat: generations of `max_tokens` until both `min_decode_s` of decoding and
    `min_decode_tokens` decoded tokens (or TOKEN_FLOOR_MAX_S of decoding) are summed.

    A floor in time alone let a ~65 tok/s model end its repeat after one 64-token generation
    (~1 s): too few tokens to average out the host's interruptions; a floor in tokens alone would
    make a fast tiny model's repeat a few ms.

    Decode tok/s is total tokens after the first / total decode time of those generations (a
    ratio of sums, so short and long generations weigh by their time); TTFT is their median.
    """
    import statistics
    import time

    ttfts: list[float] = []
    tokens, seconds, generated = 0, 0.0, max_tokens
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while True:
        toks, stats = rt.generate(ids, max_tokens, stop_at_eos=False)
        ttfts.append(stats.ttft_s)
        tokens += max(0, stats.generated_tokens - 1)
        seconds += stats.decode_s
        generated = min(generated, len(toks))
        floor = tokens >= min_decode_tokens or seconds >= TOKEN_FLOOR_MAX_S
        enough = seconds >= min_decode_s and floor
        if enough or len(ttfts) >= max_runs or stats.generated_tokens < 2:
            break
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        # CPU time of the whole process / (wall x threads): the share of its pinned CPUs it got
        "cpu_share": cpu / (wall * rt.threads) if wall > 0 else 0.0,
        "ttft_s": statistics.median(ttfts),
        "decode_tps": tokens / seconds if seconds > 0 else 0.0,
        "generated": generated,
        "decode_tokens": tokens,
        "runs": len(ttfts),
    }


def _thread_count() -> int:
    """OS threads of this process: shows whether a runtime honoured its thread setting."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _error_text(exc: BaseException) -> str:
    from slmops.core.errors import SlmopsError

    if isinstance(exc, SlmopsError):
        return exc.render()
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m slmops.evaluate.perf_child SPEC.json RESULT.json\n")
        return 2
    die_with_parent()
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cpus"])
    result: dict[str, Any] = {"pid": os.getpid()}
    if hasattr(os, "sched_getaffinity"):
        result["affinity"] = sorted(os.sched_getaffinity(0))
    try:
        result.update(measure_in_process(spec))
        result["status"] = "ok"
    except Exception as exc:
        result.update(status="error", detail=_error_text(exc))
    from slmops.core.atomic import write_json_atomic

    write_json_atomic(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
