"""Performance harness: each variant x device profile measured in its own pinned, watched process.

Why a subprocess per (variant, profile):
- Pinning: the child gets CPU affinity to the profile's core count (set in preexec, before the
  interpreter starts) and the runtime gets the same thread count, so a 4-core profile is not
  measured with 16 cores' worth of threads.
- The memory ceiling: the parent samples the child's RSS (and its children's) with psutil (every
  15 ms while it grows, every 250 ms once settled) and kills it above profile.ram_mb; the result
  is "does-not-fit", never a crash. RSS, not
  RLIMIT_AS: address-space limits count mmapped weights that are never touched and reserved
  arenas, so they refuse models that would run fine.
- Isolation: a native crash, a hang (timeout) or a model that fails to load becomes an "error"
  row with the message, and the evaluation goes on.

Host numbers are measured; device numbers are projections (host x relative_speed), labelled so.
Heavy imports (runtimes, numpy, gguf) happen in the child or inside functions.

Why speed figures were noise (gguf-q4_k_m measured 2,348 tok/s under one profile and 1,041 under
another in one run, both with 2 threads: every built-in profile has >= 4 cores, so on a 2-core
host all are measured with 2). Not the core count, not first-run effects (each child warms up)
and not CPU frequency (a VM without cpufreq; the clock is fixed): contention. llama.cpp's threads
meet at a barrier after every graph node, dozens per token; with as many threads as host CPUs,
any other runnable process deschedules one of them for a scheduler slice (ms) while the other
spins, so a token that takes 0.5 ms alone takes several ms. Measured here with other jobs
running (load ~8 on 2 CPUs): the tiny Q4_K_M at 2 threads 26-415 tok/s between repeats against
2,900-3,300 at 1 thread; Gemma 3 270M Q4_K_M at 2 threads 1.2-29 tok/s (3 median) against
10-13 at 1 thread. ONNX Runtime GenAI suffers far less (1,600-2,250 tok/s). A single 64-token
generation of the demo model lasts ~30 ms, so one preemption moved its figure by 10-50 %.

What the harness does about it (the host's load cannot be removed, only measured and spread):
- Each timed repeat sums >= min_decode_s (0.3 s) of decoding over several generations
  (perf_child.timed_repeat), so one preemption costs a few percent, not half the figure.
  `min_decode_tokens` can add a floor in tokens (default 0). A 256-token floor was tried on
  Gemma 3 270M: it made each evaluation ~4 min longer and did not bring the spreads under 10 %
  (15 of 20 figures over, against 18 of 20 without it an hour later on the same quiet box), because
  what dominates is the host's own drift: the median of all variants in one round moved
  58 -> 66 -> 67 tok/s under one profile and 73 -> 68 -> 55 under the other, rounds minutes apart.
  Interleaving makes that drift hit every variant alike (selection stays the same), but no
  repeat length removes it from one variant's (max - min) / median.
- The watchdog samples RSS every 15 ms only while the child's memory grows (load) or is near
  the ceiling; once it has settled it backs off to every 250 ms (_watch). Its ~70 wakeups/s
  ran on the same 2 CPUs as llama.cpp's 2 threads, about one per decoded token of a 270M model.
  The ceiling stays enforced: growth brings the fast rate back, and the child's own VmHWM
  (perf_child) catches a spike between samples, so a variant over its RAM is still does-not-fit.
  Still open (measured on Gemma 3 270M Q3_K_M, 2 threads, a minute of load ~1, CPU share 0.99):
  within one child, 4 repeats of 315 tokens spread 4.7 %; across 3 fresh children (one per
  interleaved round) 16-17 %, and 22-25 % with 63-token repeats. What remains is between
  loads of the model, not within a repeat; its cause is not found yet.
- Variants of a profile are interleaved: round r measures every variant once, in the order
  A B C on even rounds and C B A on odd ones (`interleaved_order`), each round in a fresh
  child (load, warm-up, one timed repeat), so drift in the host's load hits every variant alike.
- Every repeat records the CPU share its process got (CPU time / wall / threads); a median
  below CONTENDED_SHARE marks the result "contended" in its detail, and a spread (max - min) /
  median above 10 % marks the figure "unstable" (schema.Stat.unstable).
- Selection decides on medians and ignores misses within the measured noise (select.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.core.errors import SlmopsError, UserInputError
from slmops.core.units import MIB, fmt_bytes
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import PerfResult, Stat

SAMPLE_INTERVAL_S = 0.015
"""RSS sampling interval while the child's memory grows (load) or is within NEAR_CEILING."""
SETTLED_INTERVAL_S = 0.25
"""Sampling interval once the RSS has stopped growing (the timed decode: see _watch)."""
SETTLE_GROWTH_BYTES = 2 * 1024 * 1024
NEAR_CEILING = 0.8
CHILDREN_SCAN_S = 0.5  # between scans for grandchildren: a /proc walk costs ~1 ms
STDERR_TAIL = 600


def available_cpus() -> list[int]:
    """CPUs this process may run on (affinity-aware: a container's cpuset, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # pragma: no cover  (non-Linux)


def pinned_cpus(cores: int) -> list[int]:
    """The first min(cores, available) CPUs: the set a profile's measurement is pinned to."""
    cpus = available_cpus()
    return cpus[: max(1, min(cores, len(cpus)))]


@functools.cache
def host_cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass
class ChildOutcome:
    """What the parent saw of one measuring process, and the child's raw result (None if none)."""

    returncode: int | None
    peak_rss: int
    exceeded: bool
    timed_out: bool
    stderr: str
    wall_s: float
    result: dict[str, Any] | None


def _rss(procs: list[Any]) -> int:
    import psutil

    total = 0
    for p in procs:
        try:
            total += int(p.memory_info().rss)
        except psutil.Error:
            continue
    return total


def _watch(child: subprocess.Popen[bytes], ceiling: int, deadline: float) -> tuple[int, bool, bool]:
    """Sample RSS until the child exits; kill it (and its children) above `ceiling` or late.

    Every SAMPLE_INTERVAL_S while the RSS grows or is near the ceiling; once it has settled
    the interval stretches (x1.5 per quiet sample) to SETTLED_INTERVAL_S, so the timed decode
    is not interrupted by ~70 wakeups/s of this process on the CPUs the child is pinned to. A
    spike between two slow samples still counts: the child reports its own VmHWM (_to_result).
    """
    import psutil

    try:
        root = psutil.Process(child.pid)
    except psutil.NoSuchProcess:  # exited (and was reaped) before the first sample
        return 0, False, False
    procs: list[Any] = [root]
    peak, interval, next_scan = 0, SAMPLE_INTERVAL_S, 0.0
    while child.poll() is None:
        now = time.perf_counter()
        if now >= next_scan:
            next_scan = now + CHILDREN_SCAN_S
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = [root]
        rss = _rss(procs)
        exceeded, late = rss > ceiling, now > deadline
        if exceeded or late:
            for p in reversed(procs):  # grandchildren first, then the child
                with contextlib.suppress(psutil.Error):
                    p.kill()
            child.wait()
            return max(peak, rss), exceeded, late
        growing = rss > peak + SETTLE_GROWTH_BYTES or rss > ceiling * NEAR_CEILING
        interval = SAMPLE_INTERVAL_S if growing else min(interval * 1.5, SETTLED_INTERVAL_S)
        peak = max(peak, rss)
        time.sleep(interval)
    return peak, False, False


def run_pinned(
    spec: dict[str, Any], cpus: list[int], ceiling_bytes: int, timeout_s: float
) -> ChildOutcome:
    """Run perf_child on `spec` pinned to `cpus`; kill it above `ceiling_bytes` RSS or on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus)), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="slmops-perf-") as tmp:
        work = Path(tmp)
        spec_file, res_file, err_file = work / "spec.json", work / "result.json", work / "stderr"
        # The child pins itself and arms its parent-death signal first thing (perf_child.main).
        # No preexec_fn here on purpose: that forces fork(), and a forked child's RSS counts the
        # evaluator's pages (torch, the reference model) until exec, which the watchdog would see.
        spec_file.write_text(json.dumps({**spec, "cpus": cpus}), encoding="utf-8")
        t0 = time.perf_counter()
        with err_file.open("wb") as err:
            child = subprocess.Popen(
                [sys.executable, "-m", "slmops.evaluate.perf_child", str(spec_file), str(res_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        try:
            peak, exceeded, late = _watch(child, ceiling_bytes, t0 + timeout_s)
        finally:
            if child.poll() is None:  # the watcher itself failed: leave no orphan
                child.kill()
            child.wait()
        wall = time.perf_counter() - t0
        stderr = err_file.read_text(encoding="utf-8", errors="replace")[-STDERR_TAIL:].strip()
        result = json.loads(res_file.read_text()) if res_file.exists() else None
    return ChildOutcome(child.returncode, peak, exceeded, late, stderr, wall, result)


def _runtime_name(variant_dir: Path) -> str:
    from slmops.runtimes.base import runtime_for

    try:
        return runtime_for(variant_dir).name
    except SlmopsError:
        return "unknown"


def _mib(n: float) -> str:
    return fmt_bytes(n)


CONTENDED_SHARE = 0.5
"""Below this median CPU share (CPU time / wall / threads) a measurement was starved of its CPUs."""

DEFAULT_MIN_DECODE_S = 0.3
"""Decode seconds summed per timed repeat (see perf_child.timed_repeat and the module docstring)."""

DEFAULT_MIN_DECODE_TOKENS = 0
"""Decoded tokens summed per timed repeat, on top of DEFAULT_MIN_DECODE_S (perf_child); off by
default (see the module docstring for why)."""


def interleaved_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of one round: as given on even rounds, reversed on odd ones (A B C, C B A, ...).

    Over an even number of rounds every variant's mean position is the same, so a slow drift of
    the host (another process starting, a neighbour's build) loads every variant alike instead of
    whichever happened to run last.
    """
    return list(names) if round_index % 2 == 0 else list(reversed(names))


@dataclass
class _Pending:
    """One variant of an interleaved measurement: its base fields, child spec and rounds so far."""

    base: dict[str, Any]
    spec: dict[str, Any]
    runs: list[ChildOutcome]
    order: list[int]
    done: PerfResult | None = None


def _prepare(
    name: str, variant_dir: Path, profile: DeviceProfile, cpus: list[int], text: str, **knobs: Any
) -> _Pending:
    from slmops.evaluate.memory import memory_at_context, runtime_context

    variant_dir = Path(variant_dir)
    base: dict[str, Any] = {
        "variant": name,
        "profile": profile.name,
        "runtime": _runtime_name(variant_dir),
        "threads": len(cpus),
        "repeats": knobs["repeats"],
        "memory_ceiling_bytes": profile.ram_mb * MIB,
        "measured_on": f"host ({host_cpu_name()}, {len(cpus)} threads)",
    }
    pending = _Pending(base, {}, [], [])
    try:
        n_ctx = runtime_context(variant_dir, profile.context_length)
        base["memory_at_context_bytes"] = memory_at_context(variant_dir, n_ctx)
    except (SlmopsError, OSError) as exc:
        pending.done = PerfResult(**base, status="error", detail=str(exc))
        return pending
    max_tokens = knobs["max_tokens"]
    pending.spec = {
        "variant_dir": str(variant_dir.resolve()),
        "threads": len(cpus),
        "n_ctx": n_ctx,
        "prompt_tokens": max(1, min(profile.prompt_tokens, n_ctx - max_tokens - 1)),
        "max_tokens": max_tokens,
        "min_decode_s": knobs["min_decode_s"],
        "min_decode_tokens": knobs["min_decode_tokens"],
        "text": text,
    }
    return pending


def measure_interleaved(
    variants: Sequence[tuple[str, Path]],
    profile: DeviceProfile,
    *,
    text: str,
    repeats: int = 3,
    max_tokens: int = 64,
    min_decode_s: float = DEFAULT_MIN_DECODE_S,
    min_decode_tokens: int = DEFAULT_MIN_DECODE_TOKENS,
    timeout_s: float = 300,
) -> list[PerfResult]:
    """Measure several variants on one profile, interleaved; one result per variant, in order.

    With two or more variants, repeat r of every variant is taken in round r, each round in its
    own freshly started child per variant (load, warm-up, one timed repeat), and the order of the
    variants alternates between rounds (`interleaved_order`). A variant that does not fit, fails
    or times out is dropped from the later rounds. With one variant there is nothing to interleave
    with: one child takes all the repeats after a single load and warm-up.
    """
    if repeats < 1 or max_tokens < 2 or min_decode_s < 0 or min_decode_tokens < 0:
        raise UserInputError(
            f"repeats={repeats}, max_tokens={max_tokens}, min_decode_s={min_decode_s}, "
            f"min_decode_tokens={min_decode_tokens}: need at least 1 repeat, 2 tokens and a "
            "non-negative decode time and token count",
            hint="decode speed counts the tokens after the first one",
        )
    cpus = pinned_cpus(profile.cores)
    knobs = {
        "repeats": repeats,
        "max_tokens": max_tokens,
        "min_decode_s": min_decode_s,
        "min_decode_tokens": min_decode_tokens,
    }
    items = [_prepare(n, d, profile, cpus, text, **knobs) for n, d in variants]
    live = [p for p in items if p.done is None]
    rounds, per_child = (repeats, 1) if len(live) > 1 else (1, repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in range(rounds):
        order = interleaved_order([p.base["variant"] for p in live], r)
        by_name = {p.base["variant"]: p for p in live}
        for pos, name in enumerate(order):
            p = by_name[name]
            run = run_pinned(
                {**p.spec, "repeats": per_child}, cpus, p.base["memory_ceiling_bytes"], timeout_s
            )
            p.runs.append(run)
            p.order.append(pos)
            ok = run.result is not None and run.result.get("status") == "ok"
            if not ok or run.exceeded or run.timed_out:
                p.done = _to_result(p.base, profile, run, timeout_s)
        live = [p for p in live if p.done is None]
    out = []
    for p in items:
        if p.done is None:
            p.done = _to_result(p.base, profile, _merge(p.runs), timeout_s)
        out.append(p.done.model_copy(update={"order": p.order, "host_load": load}))
    return out


def _merge(runs: list[ChildOutcome]) -> ChildOutcome:
    """The rounds of one variant as if one child had taken them all (lists concatenated)."""
    if len(runs) == 1:
        return runs[0]
    results = [r.result or {} for r in runs]
    merged = dict(results[0])
    keys = ("load_s", "ttft_s", "decode_tps", "generated", "decode_tokens", "runs", "cpu_share")
    for key in (*keys, "rss"):
        merged[key] = [v for res in results for v in res.get(key, [])]
    last = runs[-1]
    return ChildOutcome(
        last.returncode,
        max(r.peak_rss for r in runs),
        False,
        False,
        last.stderr,
        sum(r.wall_s for r in runs),
        merged,
    )


def measure(
    variant_name: str,
    variant_dir: Path,
    profile: DeviceProfile,
    *,
    text: str,
    repeats: int = 3,
    max_tokens: int = 64,
    min_decode_s: float = DEFAULT_MIN_DECODE_S,
    min_decode_tokens: int = DEFAULT_MIN_DECODE_TOKENS,
    timeout_s: float = 300,
) -> PerfResult:
    """Measure one variant on one profile (pinned, watched subprocess); never raises for a bad model.

    The prompt is profile.prompt_tokens tokens of `text` (repeated if short), clipped so that
    prompt + max_tokens fit the context; the context is profile.context_length capped to the
    model's own maximum.
    """
    return measure_interleaved(
        [(variant_name, variant_dir)],
        profile,
        text=text,
        repeats=repeats,
        max_tokens=max_tokens,
        min_decode_s=min_decode_s,
        min_decode_tokens=min_decode_tokens,
        timeout_s=timeout_s,
    )[0]


def _to_result(
    base: dict[str, Any], profile: DeviceProfile, run: ChildOutcome, timeout_s: float
) -> PerfResult:
    ceiling, res = base["memory_ceiling_bytes"], run.result
    over = f"exceeded the {_mib(ceiling)} available on {profile.name}"
    if run.exceeded:
        detail = f"peak RSS {_mib(run.peak_rss)} {over} (stopped after {run.wall_s:.1f} s)"
        return PerfResult(
            **base, status="does-not-fit", detail=detail, peak_rss_bytes=Stat.of([run.peak_rss])
        )
    if run.timed_out:
        return PerfResult(**base, status="error", detail=f"timed out after {timeout_s:g} s")
    if res is None:
        code = run.returncode or 0
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        detail = f"the measuring process died ({how}) without a result"
        return PerfResult(
            **base, status="error", detail=f"{detail}: {run.stderr}" if run.stderr else detail
        )
    if res.get("status") != "ok":
        return PerfResult(**base, status="error", detail=str(res.get("detail", "unknown error")))
    base["runtime"] = res["runtime"]
    # getrusage sees spikes between watchdog samples; the watchdog also sees grandchildren
    rss = Stat.of([max(*res["rss"], run.peak_rss)])
    ttft = Stat.of([t * 1000 for t in res["ttft_s"]])
    tps = Stat.of(res["decode_tps"])
    notes = []
    if min(res["generated"]) < res["max_tokens"]:
        notes.append(f"the runtime stopped early: {min(res['generated'])} tokens in one repeat")
    unstable = [k for k, st in (("decode_tps", tps), ("ttft_ms", ttft)) if st.unstable]
    if unstable:
        spreads = ", ".join(
            f"{k} {st.spread:.0%}"
            for k, st in (("decode_tps", tps), ("ttft_ms", ttft))
            if st.unstable
        )
        notes.append(f"unstable: spread over repeats {spreads} (> 10 %)")
    fits = rss.max <= ceiling  # the watchdog can miss a spike between two samples; getrusage not
    if not fits:
        notes.insert(0, f"peak RSS {_mib(rss.max)} {over}")
    decoded, share = res.get("decode_tokens"), res.get("cpu_share")
    cpu_share = Stat.of(share) if share else None
    if cpu_share is not None and cpu_share.median < CONTENDED_SHARE:
        notes.append(
            f"contended: the measuring process got {cpu_share.median:.0%} of its "
            f"{base['threads']} CPU(s) (other processes were running): speeds read low"
        )
    return PerfResult(
        **base,
        status="ok" if fits else "does-not-fit",
        detail="; ".join(notes),
        load_time_s=Stat.of(res["load_s"]),
        ttft_ms=ttft,
        decode_tps=tps,
        peak_rss_bytes=rss,
        projected_ttft_ms=ttft.median / profile.relative_speed,
        projected_decode_tps=tps.median * profile.relative_speed,
        unstable=unstable,
        decode_tokens=min(decoded) if decoded else None,
        cpu_share=cpu_share,
    )


def direct_decode_tps(
    variant_dir: Path,
    threads: int,
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    n_ctx: int | None = None,
    repeats: int = 3,
) -> float:
    """Median decode tokens/s from the runtime called in this process, without the harness.

    The baseline the bench compares the harness against: same runtime, threads, prompt and
    warm-up, but no subprocess, no pinning, no watchdog. `n_ctx` defaults to the model's maximum (<= 2048).
    """
    import statistics

    from slmops.evaluate.memory import runtime_context
    from slmops.runtimes import open_runtime

    ctx = n_ctx or runtime_context(Path(variant_dir), 2048)
    rt = open_runtime(variant_dir, threads=threads, n_ctx=ctx)
    try:
        rt.generate(prompt_ids, max_tokens, stop_at_eos=False)  # warm-up, as the harness does
        runs = [rt.generate(prompt_ids, max_tokens, stop_at_eos=False)[1] for _ in range(repeats)]
    finally:
        rt.close()
    return statistics.median(s.decode_tokens_per_s for s in runs)
