"""Bundle inputs on disk: fabricated variant folders (real lineage cards and digests) and a
hand-made evaluation report over them, built into a bundle by the real builder.

Self-contained (imports only slmops): bench/_load.py and tests/fleet load it by path and
swap VARIANTS before calling make_inputs.
"""

from __future__ import annotations

from pathlib import Path

from slmops.bundle.build import build_bundle
from slmops.core.atomic import TMP_PREFIX, write_json_atomic
from slmops.core.digest import tree_digest, tree_size
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import (
    EvalReport,
    HostInfo,
    PerfResult,
    QualityProtocol,
    QualityResult,
    Selection,
    Stat,
    VariantInfo,
    Verdict,
)
from slmops.model.card import LineageCard
from slmops.protocol.bundle import QualityBaseline
from slmops.protocol.telemetry import BOUNDS

MB = 2**20
TOKENIZER = b'{"model": {"type": "BPE", "vocab": {"a": 0}}}'  # shared by both ONNX variants
# name -> (format, quantization, files); the two ONNX variants share their tokenizer files.
VARIANTS: dict[str, tuple[str, str, dict[str, bytes]]] = {
    "q8": ("gguf", "Q8_0", {"model.gguf": b"GGUF" + bytes(range(256)) * 16}),
    "q4": ("gguf", "Q4_K_M", {"model.gguf": b"GGUF" + bytes(range(255, -1, -1)) * 8}),
    "int4": (
        "onnx-genai",
        "INT4",
        {
            "model.onnx": b"onnx-int4-graph",
            "model.onnx.data": b"\x01" * 3000,
            "tokenizer.json": TOKENIZER,
            "genai_config.json": b'{"model": {"context_length": 256}}',
        },
    ),
    "int8": (
        "onnx-genai",
        "INT8",
        {
            "model.onnx": b"onnx-int8-graph",
            "model.onnx.data": b"\x02" * 5000,
            "tokenizer.json": TOKENIZER,
            "genai_config.json": b'{"model": {"context_length": 256}}',
        },
    ),
}
RUNTIME = {"gguf": "llama.cpp", "onnx-genai": "onnxruntime-genai"}


def make_variant(root: Path, name: str, fmt: str, quant: str, files: dict[str, bytes]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    LineageCard(
        format=fmt,
        digest=tree_digest(d),
        size_bytes=tree_size(d),
        origin_digest="sha256:" + "1" * 64,
        variant=name,
        quantization=quant,
        created_at="2026-01-01T00:00:00+00:00",
    ).write(d)
    return d


def _profile(name: str, ram_mb: int, context: int) -> DeviceProfile:
    return DeviceProfile.model_validate(
        {
            "name": name,
            "arch": "arm64",
            "cores": 4,
            "ram_mb": ram_mb,
            "storage_mb": 32768,
            "runtimes": ["gguf", "onnx-genai"],
            "context_length": context,
            "relative_speed": 0.5,
            "budgets": {"max_ttft_ms": 1500, "min_decode_tps": 8, "max_kld": 0.15},
            "cost": {"hardware_usd": 80, "lifetime_years": 5, "power_watts": 7},
        }
    )


def make_baseline(i: int) -> QualityBaseline:
    """A field baseline: 8 prompts, all of them running to 64 tokens."""
    logprob = [0.0] * (len(BOUNDS["logprob"]) + 1)
    logprob[3], logprob[7] = 200.0 + i, 312.0 - i
    output_tokens = [0.0] * (len(BOUNDS["output_tokens"]) + 1)
    output_tokens[6] = 8.0
    return QualityBaseline(
        logprob=logprob, output_tokens=output_tokens, prompts=8, max_tokens=64, tokens=512
    )


def make_report(variants_dir: Path, names: list[str]) -> EvalReport:
    """Two profiles: `pi` (everything fits, q8 selected) and `gw` (only q4 fits and is selected).
    Every variant but int8 has a field baseline (int8 stands for a report from before them)."""
    profiles = [_profile("pi", 4096, 2048), _profile("gw", 700, 1024)]
    infos, quality, perf, verdicts = [], {}, [], []
    for i, n in enumerate(names):
        fmt, quant, files = VARIANTS[n]
        infos.append(
            VariantInfo(
                name=n,
                path=str(variants_dir / n),
                format=fmt,
                runtime=RUNTIME[fmt],
                quantization=quant,
                weights_bytes=sum(len(b) for b in files.values()),
                parameters=1000,
                digest=tree_digest(variants_dir / n),
            )
        )
        kld = 0.001 * (i + 1)
        quality[n] = QualityResult(
            kld_mean=kld,
            kld_p99=kld * 10,
            kld_ci95=(kld * 0.8, kld * 1.2),
            top1_agreement=0.99,
            perplexity=220.0,
            reference_perplexity=219.0,
            baseline=None if n == "int8" else make_baseline(i),
        )
        for p in profiles:
            rss = (100 + 10 * i) * MB + (0 if p.name == "pi" else 1)
            perf.append(
                PerfResult(
                    variant=n,
                    profile=p.name,
                    runtime=RUNTIME[fmt],
                    threads=2,
                    repeats=3,
                    status="ok",
                    peak_rss_bytes=Stat.of([rss - 1, float(rss)]),
                    memory_ceiling_bytes=p.ram_mb * MB,
                    memory_at_context_bytes=(200 + i) * MB * (2 if p.name == "pi" else 1),
                )
            )
            verdicts.append(Verdict(variant=n, profile=p.name, fits=p.name == "pi" or n == "q4"))
    selections = [
        Selection(profile="pi", variant=names[0], reason="lowest KLD"),
        Selection(profile="gw", variant="q4" if "q4" in names else None, reason="only fit"),
    ]
    return EvalReport(
        created_at="2026-02-02T00:00:00+00:00",
        slmops_version="0.1.0",
        reference={"name": "tiny", "digest": "sha256:" + "1" * 64},
        host=HostInfo(cpu="test", cores=2, ram_bytes=8 << 30, platform="linux"),
        protocol=QualityProtocol(
            text_source="heldout.txt",
            text_digest="ab" * 32,
            windows=2,
            window_tokens=64,
            scored_from=32,
            tokens_scored=64,
            bos=True,
            description="test protocol",
        ),
        profiles=profiles,
        variants=infos,
        quality=quality,
        perf=perf,
        verdicts=verdicts,
        selections=selections,
    )


def make_inputs(root: Path, names: list[str] | None = None) -> tuple[Path, Path]:
    """A variants folder with every VARIANTS entry and a report dir evaluating `names` of them."""
    names = names or list(VARIANTS)
    variants_dir, report_dir = root / "variants", root / "report"
    for n, (fmt, quant, files) in VARIANTS.items():
        make_variant(variants_dir, n, fmt, quant, files)
    report = make_report(variants_dir, names)
    write_json_atomic(report_dir / "report.json", report.model_dump(mode="json", by_alias=True))
    (report_dir / "report.md").write_text("# report\n")
    (report_dir / "report.html").write_text("<h1>report</h1>\n")
    (report_dir / "charts").mkdir()
    (report_dir / "charts" / "pi-kld-vs-size.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    return variants_dir, report_dir


def build(root: Path, out: Path | None = None, **kw: object) -> Path:
    """Inputs under root/in (made once) and a bundle at `out` (default root/bundle)."""
    if not (root / "in").exists():
        make_inputs(root / "in")
    out = out or root / "bundle"
    opts: dict[str, object] = {"name": "acme/bot", "version": "1.0.0"} | kw
    build_bundle(root / "in" / "variants", root / "in" / "report", out=out, **opts)  # type: ignore[arg-type]
    return out


def blob_count(bundle: Path) -> int:
    return len(list((bundle / "blobs" / "sha256").iterdir()))


def no_temp_left(parent: Path) -> bool:
    return not any(p.name.startswith(TMP_PREFIX) for p in parent.iterdir())
