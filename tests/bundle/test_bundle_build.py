"""Building bundles: content, determinism, idempotence, dedup, and refusals.

The variant folders here hold small fake weight files (bytes starting with b"GGUF", a few KB
of ONNX-looking bytes) with real lineage cards, and the report is a real `EvalReport` built by
hand. That is deliberate: these tests are about packaging (digests, layout, refusals), which
never looks inside a weight file, so training and converting a model would only slow them down.
The factory functions are imported by the other test_bundle_* modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.bundle.build import build_bundle
from slmops.bundle.layout import Index, Manifest, OciLayout
from slmops.bundle.media import (
    ANN_TITLE,
    ANN_VARIANT,
    ARTIFACT_BUNDLE,
    MAX_MANIFEST_BYTES,
    MT_CARD,
    MT_TOKENIZER,
    MT_WEIGHTS_GGUF,
)
from slmops.bundle.verify import verify_bundle
from slmops.core.atomic import TMP_PREFIX, write_json_atomic
from slmops.core.digest import tree_digest, tree_size
from slmops.core.errors import ConfigError, UserInputError
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
from slmops.protocol.bundle import QualityBaseline, VariantDescriptor
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


# --- tests -----------------------------------------------------------------------------------


def test_round_trip_build_then_verify(tmp_path: Path) -> None:
    bundle = build(tmp_path)
    res = verify_bundle(bundle, [], require_signature=False)
    assert res.name == "acme/bot" and res.version == "1.0.0"
    assert res.variants == list(VARIANTS)
    assert res.digest.startswith("sha256:") and res.signed_by == []
    layout = OciLayout(bundle)
    top = layout.read_index()
    assert [d.artifact_type for d in top.manifests] == [ARTIFACT_BUNDLE]
    index = Index.model_validate(layout.read_json(top.manifests[0], MAX_MANIFEST_BYTES, what="i"))
    first = index.manifests[0]
    assert first.annotation(ANN_VARIANT) == "q8"
    m = Manifest.model_validate(layout.read_json(first, MAX_MANIFEST_BYTES, what="m"))
    assert [(x.annotation(ANN_TITLE), x.media_type) for x in m.layers] == [
        ("model.gguf", MT_WEIGHTS_GGUF),
        ("slmops-card.json", MT_CARD),
    ]


def test_descriptor_carries_the_evaluated_numbers(tmp_path: Path) -> None:
    from slmops.bundle.inspect import inspect_bundle

    info = inspect_bundle(build(tmp_path))
    q4 = next(v["descriptor"] for v in info["variants"] if v["name"] == "q4")
    assert q4["runtime"] == "llama.cpp" and q4["quantization"] == "Q4_K_M"
    assert q4["ram_bytes"] == 201 * MB * 2 and q4["ram_context_tokens"] == 2048  # max: pi
    assert q4["peak_rss_bytes"] == 110 * MB + 1
    assert q4["selected_for"] == ["gw"] and q4["fits"] == ["gw", "pi"]
    assert q4["kld_mean"] == pytest.approx(0.002)
    assert q4["card_digest"] == next(
        f["digest"]
        for f in next(v for v in info["variants"] if v["name"] == "q4")["files"]
        if f["title"] == "slmops-card.json"
    )
    assert info["selection"] == {"pi": "q8", "gw": "q4"}
    assert [f["title"] for f in info["report"]] == [
        "report.json",
        "report.html",
        "report.md",
        "charts/pi-kld-vs-size.png",
    ]


def test_descriptor_carries_the_field_baseline_and_still_verifies(tmp_path: Path) -> None:
    from slmops.bundle.inspect import inspect_bundle

    bundle = build(tmp_path)
    assert verify_bundle(bundle, [], require_signature=False).variants == list(VARIANTS)
    descriptors = {v["name"]: v["descriptor"] for v in inspect_bundle(bundle)["variants"]}
    report = json.loads((tmp_path / "in" / "report" / "report.json").read_text())
    for name, desc in descriptors.items():
        assert desc["baseline"] == report["quality"][name]["baseline"]
    q4 = VariantDescriptor.model_validate(descriptors["q4"])
    assert q4.baseline is not None and q4.baseline.prompts == 8
    assert len(q4.baseline.logprob) == len(BOUNDS["logprob"]) + 1
    assert sum(q4.baseline.output_tokens) == 8 and sum(q4.baseline.logprob) == 512
    assert descriptors["int8"]["baseline"] is None  # evaluated before baselines existed


def test_old_descriptors_and_reports_without_baselines_still_load(tmp_path: Path) -> None:
    from slmops.bundle.inspect import inspect_bundle
    from slmops.evaluate.gate import load_report

    desc = inspect_bundle(build(tmp_path))["variants"][0]["descriptor"]
    desc.pop("baseline")
    assert VariantDescriptor.model_validate(desc).baseline is None
    report_json = tmp_path / "in" / "report" / "report.json"
    data = json.loads(report_json.read_text())
    for q in data["quality"].values():
        q.pop("baseline")
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps(data))
    assert all(q.baseline is None for q in load_report(old).quality.values())


def test_baseline_histograms_must_have_the_shared_bucket_count() -> None:
    good = make_baseline(0).model_dump()
    with pytest.raises(ValueError, match="'logprob' has 3 buckets, expected 11"):
        QualityBaseline.model_validate(good | {"logprob": [1.0, 2.0, 3.0]})


def test_rebuild_gives_the_same_digest_and_is_idempotent(tmp_path: Path) -> None:
    a = build(tmp_path, tmp_path / "a")
    b = build(tmp_path, tmp_path / "b")
    ta = build(tmp_path, tmp_path / "a.tar", format="tar")
    tb = build(tmp_path, tmp_path / "b.tar", format="tar")
    da = verify_bundle(a, [], require_signature=False).digest
    assert da == verify_bundle(b, [], require_signature=False).digest
    assert da == verify_bundle(ta, [], require_signature=False).digest
    assert ta.read_bytes() == tb.read_bytes()  # the tar form is byte-for-byte reproducible
    again = build_bundle(
        tmp_path / "in" / "variants",
        tmp_path / "in" / "report",
        name="acme/bot",
        version="1.0.0",
        out=a,
    )
    assert again.digest == da and again.unchanged


def test_same_version_with_different_content_is_refused(tmp_path: Path) -> None:
    bundle = build(tmp_path)
    first = verify_bundle(bundle, [], require_signature=False).digest
    with pytest.raises(UserInputError) as exc:
        build(tmp_path, bundle, created="2027-01-01T00:00:00Z")  # different content
    assert exc.value.exit_code == 2
    assert first in str(exc.value) and "already exists" in str(exc.value)
    assert verify_bundle(bundle, [], require_signature=False).digest == first  # untouched
    with pytest.raises(UserInputError, match=r"already holds bundle acme/bot:1\.0\.0"):
        build(tmp_path, bundle, version="1.1.0")
    assert no_temp_left(tmp_path)


def test_identical_files_are_stored_once(tmp_path: Path) -> None:
    bundle = build(tmp_path)
    layers = sum(len(files) + 1 for _, _, files in VARIANTS.values())  # + one card each
    # configs: 4 variant descriptors + bundle info; manifests: 4 + bundle manifest; the index;
    # report: json, html, md, one chart. The ONNX tokenizer and genai_config are shared.
    expected = (layers - 2) + 5 + 5 + 1 + 4
    assert blob_count(bundle) == expected
    tok = [p for p in (bundle / "blobs" / "sha256").iterdir() if p.read_bytes() == TOKENIZER]
    assert len(tok) == 1
    from slmops.bundle.inspect import inspect_bundle

    info = inspect_bundle(bundle)
    assert info["dedup_saved_bytes"] == len(TOKENIZER) + len(
        VARIANTS["int4"][2]["genai_config.json"]
    )
    assert info["layer_bytes"] - info["unique_layer_bytes"] == info["dedup_saved_bytes"]
    int4 = next(v for v in info["variants"] if v["name"] == "int4")
    assert {f["title"]: f["media_type"] for f in int4["files"]}["tokenizer.json"] == MT_TOKENIZER


def test_report_variant_missing_from_folder_is_refused(tmp_path: Path) -> None:
    variants, report = make_inputs(tmp_path / "in", ["q8", "q4"])
    import shutil

    shutil.rmtree(variants / "q4")
    with pytest.raises(ConfigError, match="q4 are in the evaluation report but not among"):
        build_bundle(variants, report, name="acme/bot", version="1.0.0", out=tmp_path / "b")
    assert not (tmp_path / "b").exists() and no_temp_left(tmp_path)


def test_only_evaluated_variants_are_included(tmp_path: Path) -> None:
    variants, report = make_inputs(tmp_path / "in", ["q4", "int8"])
    res = build_bundle(variants, report, name="acme/bot", version="1.0.0", out=tmp_path / "b")
    assert res.variants == ["q4", "int8"]
    res = build_bundle(variants, None, name="acme/bot", version="1.0.0", out=tmp_path / "all")
    assert sorted(res.variants) == sorted(VARIANTS)  # no report: every deployable variant


def test_variant_changed_after_evaluation_is_refused(tmp_path: Path) -> None:
    variants, report = make_inputs(tmp_path / "in")
    (variants / "int8" / "model.onnx").write_bytes(b"swapped after evaluation")
    with pytest.raises(ConfigError, match="'int8' is not the one evaluated") as exc:
        build_bundle(variants, report, name="acme/bot", version="1.0.0", out=tmp_path / "b")
    assert "re-run `slmops evaluate`" in str(exc.value)
    assert not (tmp_path / "b").exists() and no_temp_left(tmp_path)


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0-", "01.0.0", "latest"])
def test_version_must_be_semver(tmp_path: Path, version: str) -> None:
    with pytest.raises(ConfigError, match="not semantic versioning"):
        build(tmp_path, version=version)


@pytest.mark.parametrize("name", ["Acme/Bot", "acme//bot", "-bot", "bot_", "a b"])
def test_name_must_be_an_oci_repository_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="not a valid OCI repository name"):
        build(tmp_path, name=name)


def test_semver_prerelease_and_build_metadata_are_accepted(tmp_path: Path) -> None:
    for v in ("1.3.0-rc.1", "2.0.0+build.7"):
        build(tmp_path, tmp_path / v, version=v)


def test_out_that_is_not_a_bundle_is_not_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not a readable slmops bundle"):
        build(tmp_path, out)
    assert (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    build(tmp_path, empty)  # an empty folder is fine
    assert json.loads((empty / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
