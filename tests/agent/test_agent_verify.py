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
