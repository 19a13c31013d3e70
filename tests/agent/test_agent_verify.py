"""Agent-side checks of one variant: each link of the trust chain refused when broken, and the
import boundary of the agent package (no torch, transformers or server code on a device)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops.agent.fetch import FetchedVariant, LayoutSource, fetch_variant
from slmops.agent.verify_variant import VariantCheckError, safe_title, verify_variant
from slmops.bundle.signing import load_trusted_keys
from slmops.protocol.device import DesiredModel

Desired = Callable[[Path, str], DesiredModel]


@pytest.fixture(scope="module")
def fetched(
    bundles: Any, desired: Desired, tmp_path_factory: pytest.TempPathFactory
) -> FetchedVariant:
    want = desired(bundles.v1, "1.0.0")
    staging = tmp_path_factory.mktemp("staging")
    return fetch_variant(LayoutSource(bundles.v1), "1.0.0", want.variant, staging)


def _verify(f: FetchedVariant, keys: Any, **override: Any) -> Any:
    args = {
        "bundle_index": f.bundle_index,
        "bundle_digest": f.bundle_digest,
        "signatures": f.signatures,
        "manifest": f.manifest,
        "manifest_digest": f.manifest_digest,
        "config": f.config,
        "files": f.files,
        "trusted_keys": keys,
    }
    return verify_variant(**(args | override))


def test_fetched_variant_verifies(fetched: FetchedVariant, bundles: Any) -> None:
    got = _verify(fetched, load_trusted_keys([bundles.pub]))
    assert (got.name, got.version, got.descriptor.name) == ("acme/bot", "1.0.0", "gguf-q8_0")
    assert any(x.title.endswith(".gguf") for x in got.layers) and len(got.signed_by) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"bundle_digest": "sha256:" + "0" * 64}, "bundle index bytes hash"),
        ({"signatures": []}, "not signed"),
        ({"manifest_digest": "sha256:" + "1" * 64}, "lists no variant manifest"),
        ({"config": b"{}"}, "config does not match"),
        ({"files": {}}, "was not downloaded"),
    ],
)
def test_each_broken_link_is_named(
    fetched: FetchedVariant, bundles: Any, override: dict[str, Any], message: str
) -> None:
    with pytest.raises(VariantCheckError, match=message):
        _verify(fetched, load_trusted_keys([bundles.pub]), **override)


def test_untrusted_and_forged_signatures(fetched: FetchedVariant, bundles: Any) -> None:
    with pytest.raises(VariantCheckError, match="untrusted"):
        _verify(fetched, load_trusted_keys([bundles.other_pub]))
    raw, layer = fetched.signatures[0]
    blob = json.loads(layer)
    blob["payload"] = blob["payload"][:-4] + "AAA="  # the signed bytes altered
    forged = json.dumps(blob).encode()
    manifest = json.loads(raw)
    manifest["layers"][0]["digest"] = "sha256:" + hashlib.sha256(forged).hexdigest()
    manifest["layers"][0]["size"] = len(forged)
    with pytest.raises(VariantCheckError):
        _verify(
            fetched,
            load_trusted_keys([bundles.pub]),
            signatures=[(json.dumps(manifest).encode(), forged)],
        )


@pytest.mark.parametrize(
    "title", ["/etc/passwd", "../x.gguf", "a/../../x", "", "a//b", ".slmops-slot.json", "a\\b"]
)
def test_unsafe_layer_titles_are_refused(title: str) -> None:
    with pytest.raises(VariantCheckError):
        safe_title(title, "test")


def test_safe_titles_pass() -> None:
    assert safe_title("model.gguf", "t") == "model.gguf"
    assert safe_title("onnx/model.onnx.data", "t") == "onnx/model.onnx.data"


def test_agent_imports_nothing_heavy() -> None:
    modules = ["slots", "fetch", "verify_variant", "health", "install"]
    code = (
        "import sys\n"
        + "".join(f"import slmops.agent.{m}\n" for m in modules)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
        + " or m.startswith('slmops.server') or m.startswith('slmops.optimize')"
        + " or m.startswith('slmops.evaluate'))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the agent imports: {out.stdout}"


# --- one chain of trust (bundle/trust.py), the agent's entry point --------------------------


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _crafted(
    pair: tuple[bytes, bytes],
    manifest_edit: Callable[[dict[str, Any]], None] = lambda m: None,
    blob_edit: Callable[[dict[str, Any]], None] = lambda b: None,
) -> tuple[bytes, bytes]:
    """A signature (manifest, layer) pair edited and re-linked, as an attacker would do."""
    raw, layer = pair
    blob = json.loads(layer)
    blob_edit(blob)
    data = json.dumps(blob).encode()
    manifest = json.loads(raw)
    manifest["layers"][0].update(digest=_sha(data), size=len(data))
    manifest_edit(manifest)
    return json.dumps(manifest).encode(), data


def _other_fp(bundles: Any) -> str:
    return next(iter(load_trusted_keys([bundles.other_pub])))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("annotation", "layer names key"),
        ("two-layers", "one application/vnd.slmops.signature"),
        ("no-subject", "has no subject"),
        ("bad-config", "expected an empty config"),
        ("layer-bytes", "does not match its digest"),
    ],
)
def test_a_malformed_signature_next_to_a_good_one_is_an_error_naming_it(
    fetched: FetchedVariant, bundles: Any, case: str, message: str
) -> None:
    """Before trust.py the agent skipped these (or counted them untrusted) and installed the
    bundle on the strength of the good signature; `slmops verify` refused the same bundle."""
    good = fetched.signatures[0]
    ann = "io.slmops.signature.key"
    other = _other_fp(bundles)
    edits: dict[str, tuple[bytes, bytes]] = {
        "annotation": _crafted(good, lambda m: m["annotations"].update({ann: other})),
        "two-layers": _crafted(good, lambda m: m["layers"].append(m["layers"][0])),
        "no-subject": _crafted(good, lambda m: m.pop("subject")),
        "bad-config": _crafted(good, lambda m: m["config"].update(mediaType="application/json")),
        "layer-bytes": (good[0], good[1] + b" "),
    }
    bad = edits[case]
    with pytest.raises(VariantCheckError, match=message) as exc:
        _verify(fetched, load_trusted_keys([bundles.pub]), signatures=[good, bad])
    assert f"signature manifest {_sha(bad[0])}" in str(exc.value), "the error names the manifest"


def test_a_signature_over_another_bundle_is_ignored_not_trusted(
    fetched: FetchedVariant, bundles: Any
) -> None:
    good = fetched.signatures[0]
    elsewhere = _crafted(good, lambda m: m["subject"].update(digest="sha256:" + "2" * 64))
    got = _verify(fetched, load_trusted_keys([bundles.pub]), signatures=[elsewhere, good])
    assert len(got.signed_by) == 1
    with pytest.raises(VariantCheckError, match="its signatures cover sha256:2222"):
        _verify(fetched, load_trusted_keys([bundles.pub]), signatures=[elsewhere])
