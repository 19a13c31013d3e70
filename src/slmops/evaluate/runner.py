"""Evaluate every variant of a folder on device profiles and write the report.

Order of work: the reference's log-probs once (memory-mapped), each variant's quality against
them, then each variant x profile in its own pinned, memory-capped child process, then verdicts,
selection, cost, charts and the report, all written atomically into REPORT_DIR.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from slmops import __version__
from slmops.core.atomic import atomic_directory
from slmops.core.errors import ConfigError, ModelFormatError
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import EvalReport, HostInfo, PerfResult, QualityResult, VariantInfo
from slmops.model.card import read_card
from slmops.model.handle import ModelFormat, detect_format, hf_parameter_count, weights_bytes
from slmops.model.variants import DEPLOYABLE, FoundVariant, discover_variants


class Listener(Protocol):
    def phase(self, name: str, total: int) -> None: ...
    def advance(self, description: str) -> None: ...


class _Silent:
    def phase(self, name: str, total: int) -> None:
        pass

    def advance(self, description: str) -> None:
        pass


@dataclass
class EvalOptions:
    reference: Path | None = None
    eval_text: Path | None = None
    tasks: Path | None = None
    repeats: int = 3
    max_tokens: int = 64
    min_decode_s: float = 0.3  # per timed repeat (perf.DEFAULT_MIN_DECODE_S)
    windows: int = 24
    window_tokens: int = 128
    threads: int = 2
    greedy_prompts: int = 8
    baseline_tokens: int = 64  # per prompt, for the field baseline (0: none)
    cloud_usd_per_million: float | None = None
    tie_kld: float = 0.002
    only: list[str] = field(default_factory=list)


def _reference_dir(options: EvalOptions, variants: list[FoundVariant]) -> Path:
    if options.reference is not None:
        ref = options.reference
    else:
        origins = {v.card.origin_path for v in variants if v.card.origin_path}
        if len(origins) != 1:
            raise ConfigError(
                "cannot tell the reference model from the cards"
                + (f" ({len(origins)} origins)" if origins else ""),
                hint="pass --reference MODEL_DIR (the original Hugging Face model)",
            )
        ref = Path(origins.pop())  # type: ignore[arg-type]
    if not ref.exists() or detect_format(ref) is not ModelFormat.HF:
        raise ModelFormatError(
            "the reference must be a Hugging Face model folder: the original model, or one "
            "written by `slmops model dequantize` when only a GGUF is at hand",
            where=ref,
            hint="pass --reference MODEL_DIR",
        )
    origins = {v.card.origin_digest for v in variants}
    if len(origins) > 1:
        raise ConfigError(
            "the variants come from different original models",
            hint="evaluate variants of one model at a time (use --variant to pick them)",
        )
    return ref


def _reference_facts(ref: Path) -> dict[str, str]:
    """What the report must say about its reference: a dequantized GGUF is not the original."""
    from slmops.model.importer import dequantized_note

    card = read_card(ref)
    note = dequantized_note(card)
    if not note:
        return {}
    quant = str(((card.origin if card else None) or {}).get("quantization") or "")
    if quant:
        # Measured on Gemma 3 270M: requantized to its own Q4_K_M, KLD 0.005; to Q5_K_M, 0.034.
        note += (
            f". KLD measures the distance from that {quant} file, so a variant requantized to "
            f"{quant} lands near the file's own grid and can score better than a higher-precision "
            "type (Q5_K_M, Q6_K) that has to re-round every weight; compare quantization levels "
            "against the original weights when you have them"
        )
        return {"note": note, "source_quantization": quant}
    return {"note": note}


def host_info() -> HostInfo:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return HostInfo(
        cpu=cpu,
        cores=cores,
        ram_bytes=int(psutil.virtual_memory().total),
        platform=platform.platform(),
    )


def _variant_info(v: FoundVariant, origin_params: int | None) -> VariantInfo:
    params = None
    if v.card.structure and v.card.structure.get("parameters_after"):
        params = int(v.card.structure["parameters_after"])
    elif origin_params:
        params = origin_params
    return VariantInfo(
        name=v.name,
        path=str(v.path),
        format=v.card.format,
        runtime=DEPLOYABLE[v.card.format],
        quantization=v.card.quantization,
        pruning=v.card.pruning_kinds(),
        weights_bytes=weights_bytes(v.path),
        parameters=params,
        digest=v.card.digest,
    )


def evaluate(
    variants_dir: Path,
    profiles: list[DeviceProfile],
    out: Path,
    options: EvalOptions | None = None,
    listener: Listener | None = None,
) -> EvalReport:
    from slmops.evaluate import quality as q
    from slmops.evaluate.charts import profile_charts
    from slmops.evaluate.cost import DEFAULT_CLOUD_USD_PER_MILLION, estimate_cost
    from slmops.evaluate.perf import measure_interleaved
    from slmops.evaluate.render import write_html, write_markdown
    from slmops.evaluate.select import judge, select
    from slmops.runtimes import open_runtime

    t0 = time.perf_counter()
    opts = options or EvalOptions()
    ui = listener or _Silent()
    variants = discover_variants(variants_dir, opts.only)
    ref_dir = _reference_dir(opts, variants)
    text_path = opts.eval_text or ref_dir / "heldout.txt"
    if opts.eval_text is None and not text_path.exists():
        raise ConfigError(
            "the reference has no heldout.txt",
            where=ref_dir,
            hint="pass --eval-text FILE with held-out text",
        )
    text = q.read_eval_text(text_path)
    tasks = q.load_tasks(opts.tasks) if opts.tasks else []

    # quality: reference once, then each variant against it
    ui.phase("quality", len(variants) + 1)
    reference = open_runtime(ref_dir, threads=opts.threads, n_ctx=opts.window_tokens + 1)
    windows = q.make_windows(
        reference, text, str(text_path), window_tokens=opts.window_tokens, max_windows=opts.windows
    )
    ref_scores = q.ReferenceScores(reference, windows)
    prompts = q.greedy_prompts(reference, text, n=opts.greedy_prompts)
    ui.advance(f"reference {ref_dir.name}: perplexity {ref_scores.perplexity:.1f}")
    quality: dict[str, QualityResult] = {}
    try:
        for v in variants:
            rt = open_runtime(v.path, threads=opts.threads, n_ctx=max(opts.window_tokens + 1, 256))
            try:
                quality[v.name] = q.score_variant(
                    rt,
                    ref_scores,
                    reference=reference,
                    prompts=prompts,
                    tasks=tasks,
                    baseline_tokens=opts.baseline_tokens,
                )
            finally:
                rt.close()
            ui.advance(f"{v.name}: KLD {quality[v.name].kld_mean:.4f}")
    finally:
        ref_scores.close()
    origin_params = hf_parameter_count(ref_dir)
    reference.close()
    del reference

    # performance: every variant x profile in its own pinned, memory-capped child
    infos = [_variant_info(v, origin_params) for v in variants]
    ui.phase("performance", len(variants) * len(profiles))
    # (interleaved rounds within a profile, so host drift loads every variant alike: perf.py)
    perf: list[PerfResult] = []
    for prof in profiles:
        runnable = []
        for v, info in zip(variants, infos, strict=True):
            if info.format not in prof.runtimes:
                ui.advance(f"{v.name} on {prof.name}: runtime not on device, skipped")
            else:
                runnable.append((v.name, v.path))
        results = measure_interleaved(
            runnable,
            prof,
            text=text,
            repeats=opts.repeats,
            max_tokens=opts.max_tokens,
            min_decode_s=opts.min_decode_s,
        )
        for res in results:
            perf.append(res)
            tps = f"{res.decode_tps.median:.0f} tok/s" if res.decode_tps else res.status
            flag = " (unstable)" if "decode_tps" in res.unstable else ""
            ui.advance(f"{res.variant} on {prof.name}: {tps}{flag}")

    verdicts = []
    selections = []
    costs = []
    cloud = (
        opts.cloud_usd_per_million
        if opts.cloud_usd_per_million is not None
        else DEFAULT_CLOUD_USD_PER_MILLION
    )
    for prof in profiles:
        pv = [
            judge(
                prof,
                info,
                quality.get(info.name),
                next((p for p in perf if p.variant == info.name and p.profile == prof.name), None),
            )
            for info in infos
        ]
        verdicts.extend(pv)
        sel = select(prof, infos, pv, quality, perf, tie_kld=opts.tie_kld)
        selections.append(sel)
        sel_perf = next(
            (p for p in perf if p.variant == sel.variant and p.profile == prof.name), None
        )
        costs.append(estimate_cost(prof, sel, sel_perf, cloud_usd_per_million=cloud))

    report = EvalReport(
        slmops_version=__version__,
        reference={
            "path": str(ref_dir),
            "digest": variants[0].card.origin_digest,
            **_reference_facts(ref_dir),
        },
        host=host_info(),
        protocol=windows.protocol,
        profiles=profiles,
        variants=infos,
        quality=quality,
        perf=perf,
        verdicts=verdicts,
        selections=selections,
        costs=costs,
        wall_time_s=0.0,
    )
    report.wall_time_s = round(time.perf_counter() - t0, 2)
    ui.phase("report", 1)
    with atomic_directory(out, replace=True) as tmp:
        charts = {p.name: profile_charts(report, p.name, tmp / "charts") for p in profiles}
        (tmp / "report.json").write_text(
            json.dumps(report.model_dump(mode="json", by_alias=True), indent=2) + "\n"
        )
        write_markdown(report, tmp, charts)
        write_html(report, tmp, charts)
    ui.advance(f"report written to {out}")
    return report
