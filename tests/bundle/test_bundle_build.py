"""Building bundles: content, determinism, idempotence, dedup, and refusals.

The variant folders here hold small fake weight files (bytes starting with b"GGUF", a few KB
of ONNX-looking bytes) with real lineage cards, and the report is a real `EvalReport` built by
hand. That is deliberate: these tests are about packaging (digests, layout, refusals), which
never looks inside a weight file, so training and converting a model would only slow them down.
The factories live in tests/factories/bundles.py, shared with the other bundle and server suites.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factories.bundles import (
    MB,
    TOKENIZER,
    VARIANTS,
    blob_count,
    build,
    make_baseline,
    make_inputs,
    no_temp_left,
)
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
from slmops.core.errors import ConfigError, UserInputError
from slmops.protocol.bundle import QualityBaseline, VariantDescriptor
from slmops.protocol.telemetry import BOUNDS

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
