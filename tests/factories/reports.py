"""A hand-built evaluation report (pure numbers, no files): two profiles and four variants chosen
to hit each fit and selection rule. Used by the evaluate suites (select, gate, cost, render).
"""

from __future__ import annotations

from slmops.evaluate.cost import estimate_costs
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import (
    EvalReport,
    HostInfo,
    PerfResult,
    QualityProtocol,
    QualityResult,
    Stat,
    VariantInfo,
)
from slmops.evaluate.select import decide

MB = 2**20
GB = 2**30


def make_profile(name: str, **over: object) -> DeviceProfile:
    base: dict[str, object] = {
        "name": name,
        "description": f"test device {name}",
        "arch": "arm64",
        "cores": 4,
        "ram_mb": 4096,
        "storage_mb": 32768,
        "runtimes": ["gguf", "onnx-genai"],
        "context_length": 2048,
        "prompt_tokens": 128,
        "relative_speed": 0.5,
        "budgets": {"max_ttft_ms": 1500, "min_decode_tps": 8, "max_kld": 0.15},
        "cost": {"hardware_usd": 80, "lifetime_years": 5, "power_watts": 7, "utilization": 0.2},
    }
    return DeviceProfile.model_validate(base | over)


# name -> (runtime, weights bytes, KLD, host decode tok/s, host TTFT ms, peak RSS bytes)
VARIANTS = {
    "f16": ("gguf", 2 * GB, 0.0004, 20.0, 200.0, int(2.1 * GB)),
    "q8": ("gguf", int(1.1 * GB), 0.0015, 35.0, 250.0, int(1.2 * GB)),
    "q4": ("gguf", 600 * MB, 0.04, 50.0, 300.0, 720 * MB),
    "int4": ("onnx-genai", 650 * MB, 0.35, 60.0, 500.0, 750 * MB),
}


def _perf(
    profile: DeviceProfile, name: str, spec: tuple[str, int, float, float, float, int]
) -> PerfResult:
    runtime, size, _, tps, ttft, rss = spec
    ram = profile.ram_mb * MB
    common = {
        "variant": name,
        "profile": profile.name,
        "runtime": runtime,
        "threads": 2,
        "repeats": 3,
        "memory_ceiling_bytes": ram,
    }
    if size > ram:  # weights alone exceed the ceiling: the runner reports it without numbers
        return PerfResult(
            **common, status="does-not-fit", detail=f"peak RSS exceeded the {ram // MB} MB ceiling"
        )
    rel = profile.relative_speed
    return PerfResult(
        **common,
        status="ok",
        load_time_s=Stat.of([0.1, 0.12, 0.11]),
        ttft_ms=Stat.of([ttft, ttft * 0.95, ttft * 1.05]),
        decode_tps=Stat.of([tps, tps * 0.95, tps * 1.05]),
        peak_rss_bytes=Stat.of([rss - MB, rss, rss - 2 * MB]),
        memory_at_context_bytes=rss + 200 * MB,
        projected_ttft_ms=ttft / rel,
        projected_decode_tps=tps * rel,
    )


def make_report(
    variants: dict[str, tuple[str, int, float, float, float, int]] | None = None,
) -> EvalReport:
    """Two profiles: `pi` (roomy; f16, q8, q4 fit) and `gw` (700 MB, gguf only; nothing fits)."""
    specs = VARIANTS if variants is None else variants
    profiles = [
        make_profile("pi"),
        make_profile(
            "gw",
            ram_mb=700,
            storage_mb=4096,
            runtimes=["gguf"],
            context_length=1024,
            relative_speed=0.15,
            budgets={"max_ttft_ms": 3000, "min_decode_tps": 4, "max_kld": 0.25},
            cost={"hardware_usd": 60, "lifetime_years": 5, "power_watts": 4, "utilization": 0.2},
        ),
    ]
    infos = [
        VariantInfo(
            name=n,
            path=f"/v/{n}",
            format=s[0],
            runtime={"gguf": "llama.cpp", "onnx-genai": "onnxruntime-genai"}[s[0]],
            weights_bytes=s[1],
            digest="sha256:" + "0" * 64,
        )
        for n, s in specs.items()
    ]
    quality = {
        n: QualityResult(
            kld_mean=s[2],
            kld_p99=s[2] * 10,
            kld_ci95=(s[2] * 0.8, s[2] * 1.2),
            top1_agreement=1 - s[2],
            perplexity=220 * (1 + s[2]),
            reference_perplexity=220.0,
            greedy_agreement=0.9,
            greedy_prompts=8,
        )
        for n, s in specs.items()
    }
    perf = [_perf(p, n, s) for p in profiles for n, s in specs.items()]
    verdicts, selections = decide(profiles, infos, quality, perf)
    report = EvalReport(
        slmops_version="0.1.0",
        reference={"name": "tiny-llama", "digest": "sha256:abc"},
        host=HostInfo(cpu="test cpu", cores=2, ram_bytes=8 * GB, platform="linux"),
        protocol=QualityProtocol(
            text_source="heldout.txt",
            text_digest="ab" * 32,
            windows=8,
            window_tokens=256,
            scored_from=128,
            tokens_scored=1024,
            bos=True,
            description="8 windows of 256 tokens; the second half of each is scored.",
        ),
        profiles=profiles,
        variants=infos,
        quality=quality,
        perf=perf,
        verdicts=verdicts,
        selections=selections,
    )
    report.costs = estimate_costs(report)
    return report
