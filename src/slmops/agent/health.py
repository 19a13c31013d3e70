"""Health check of an installed model: load it, generate a few tokens, within a latency bound.

The check runs in a child process (`python -m slmops.agent.health SPEC_JSON`) because a broken
model can crash a native runtime (a segfault in llama.cpp is not an exception): the agent must
survive to report the failure and keep serving the old model. The child calls
`die_with_parent` itself (no preexec_fn, which is unsafe with threads), so an agent killed with
kill -9 leaves no orphan holding the model's memory. It prints one JSON line and leaves with
os._exit so that runtime teardown cannot turn a good result into a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOKE_PROMPT = "The quick brown fox"


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    load_s: float
    first_token_s: float
    tokens: int
    detail: str


def health_check(
    model_dir: Path,
    *,
    threads: int,
    n_ctx: int = 256,
    max_tokens: int = 8,
    max_latency_s: float = 10.0,
    timeout_s: float = 120.0,
    lora: Path | None = None,
) -> HealthResult:
    """Fail when the model does not load, produces no token, or load + first token is slower
    than `max_latency_s` (a device that cannot answer in time is not healthy). With `lora`, the
    model is loaded with that GGUF LoRA adapter on top (llama.cpp)."""
    spec = {"path": str(model_dir), "threads": threads, "n_ctx": n_ctx, "max_tokens": max_tokens}
    if lora is not None:
        spec["lora"] = str(lora)
    cmd = [sys.executable, "-m", "slmops.agent.health", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return HealthResult(False, 0.0, 0.0, 0, f"health check timed out after {timeout_s:.0f} s")
    try:
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = proc.stderr.strip()[-500:]
        return HealthResult(
            False, 0.0, 0.0, 0, f"runtime process died (exit code {proc.returncode}): {tail}"
        )
    if out.get("status") != "ok":
        return HealthResult(False, 0.0, 0.0, 0, f"model failed to load: {out.get('detail')}")
    load_s, first_s, tokens = float(out["load_s"]), float(out["ttft_s"]), int(out["tokens"])
    if tokens == 0:
        return HealthResult(False, load_s, first_s, 0, "the model generated no token")
    if load_s + first_s > max_latency_s:
        return HealthResult(
            False,
            load_s,
            first_s,
            tokens,
            f"too slow: load {load_s:.3f} s + first token {first_s:.3f} s > {max_latency_s} s",
        )
    detail = f"load {load_s:.3f} s, first token {first_s:.3f} s, {tokens} tokens"
    return HealthResult(True, load_s, first_s, tokens, detail)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from slmops.runtimes import open_runtime
    from slmops.runtimes.base import Runtime

    t0 = time.perf_counter()
    path, threads, n_ctx = Path(spec["path"]), int(spec["threads"]), int(spec["n_ctx"])
    rt: Runtime
    if spec.get("lora"):
        from slmops.runtimes.llama_cpp import LlamaCppRuntime

        rt = LlamaCppRuntime(path, threads, n_ctx, lora_path=Path(spec["lora"]))
    else:
        rt = open_runtime(path, threads=threads, n_ctx=n_ctx)
    load_s = time.perf_counter() - t0
    try:
        ids = ([rt.bos_id] if rt.bos_id is not None else []) + rt.tokenize(SMOKE_PROMPT)
        toks, stats = rt.generate(ids, int(spec["max_tokens"]), stop_at_eos=False)
    finally:
        rt.close()
    return {"status": "ok", "load_s": load_s, "ttft_s": stats.ttft_s, "tokens": len(toks)}


def main(argv: list[str]) -> int:
    from slmops.core.process import die_with_parent

    die_with_parent()
    try:
        result = _child(json.loads(argv[0]))
    except Exception as exc:  # reported to the parent, which decides
        result = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
