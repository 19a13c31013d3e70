"""Blueprint `adapters:` by label selector: the most specific selector wins, ties to the first
name; an adapter for another base or another variant (an ONNX one) is not assigned, and the
desired state says why. Pure functions over a resolver; the registry side runs end to end in
tests/agent/test_adapter_install.py."""

from __future__ import annotations

from slmops.bundle.adapter_meta import AdapterBase, AdapterDescriptor, AdapterVariant
from slmops.protocol.device import DesiredModel
from slmops.server.adapters import AdapterTarget, place_adapter
from slmops.server.blueprints.document import Blueprint, assigned_adapter

BUNDLE = "sha256:" + "1" * 64
GGUF_MANIFEST = "sha256:" + "2" * 64
ONNX_MANIFEST = "sha256:" + "3" * 64


def blueprint(*adapters: dict[str, object]) -> Blueprint:
    return Blueprint.model_validate(
        {
            "apiVersion": "slmops/v1",
            "kind": "Blueprint",
            "metadata": {"name": "shops"},
            "spec": {"model": {"name": "bot", "version": "1.0.0"}, "adapters": list(adapters)},
        }
    )


def target(name: str, bundle: str = BUNDLE) -> AdapterTarget:
    desc = AdapterDescriptor(
        name=name,
        version="1.0.0",
        base=AdapterBase(name="bot", version="1.0.0", bundle_digest=bundle),
        variants=[
            AdapterVariant(
                name="gguf-q8_0",
                manifest_digest=GGUF_MANIFEST,
                gguf_digest="sha256:" + "4" * 64,
                gguf_bytes=10,
            )
        ],
        architecture="llama",
        rank=8,
        shapes={"blk.0.attn_q.weight": [64, 64]},
        disk_bytes=100,
    )
    return AdapterTarget(
        "sha256:" + "5" * 64, "sha256:" + "6" * 64, "sha256:" + "7" * 64, 100, desc
    )


def model(manifest: str = GGUF_MANIFEST, variant: str = "gguf-q8_0") -> DesiredModel:
    return DesiredModel(
        name="bot",
        version="1.0.0",
        variant=variant,
        bundle_digest=BUNDLE,
        manifest_digest=manifest,
        repository="bot",
    )


def test_most_specific_selector_wins_ties_to_first_name() -> None:
    bp = blueprint(
        {"selector": {}, "adapter": "fleet-wide", "version": "1.0.0"},
        {"selector": {"site": "s1"}, "adapter": "zeta", "version": "1.0.0"},
        {"selector": {"site": "s1"}, "adapter": "alpha", "version": "1.0.0"},
        {"selector": {"site": "s1", "line": "2"}, "adapter": "line-2", "version": "1.0.0"},
    )
    assert assigned_adapter(bp, {"site": "s9"}).adapter == "fleet-wide"  # type: ignore[union-attr]
    assert assigned_adapter(bp, {"site": "s1"}).adapter == "alpha"  # type: ignore[union-attr]
    got = assigned_adapter(bp, {"site": "s1", "line": "2"})
    assert got is not None and got.adapter == "line-2"
    assert assigned_adapter(blueprint(), {"site": "s1"}) is None


def test_place_adapter_checks_base_and_variant() -> None:
    bp = blueprint({"selector": {"site": "s1"}, "adapter": "menu", "version": "1.0.0"})
    placed, why = place_adapter(bp, {"site": "s1"}, model(), lambda n, v: target(n))
    assert why is None and placed.adapter is not None and placed.adapter.name == "menu"
    assert placed.adapter.layer_digest == "sha256:" + "7" * 64 and placed.adapter.size == 100
    # no assignment for these labels: nothing to explain
    assert place_adapter(bp, {"site": "s2"}, model(), lambda n, v: target(n)) == (model(), None)
    # made for another base bundle
    same, why = place_adapter(
        bp, {"site": "s1"}, model(), lambda n, v: target(n, "sha256:" + "9" * 64)
    )
    assert same.adapter is None and why is not None and "is for bot:1.0.0" in why
    # the device resolved an ONNX variant: a GGUF LoRA cannot load there
    onnx = model(ONNX_MANIFEST, "onnx-int4")
    same, why = place_adapter(bp, {"site": "s1"}, onnx, lambda n, v: target(n))
    assert same.adapter is None and why is not None and "ONNX" in why and "onnx-int4" in why
    # the resolver's own reason (not pushed, not signed) is passed on
    same, why = place_adapter(
        bp, {"site": "s1"}, model(), lambda n, v: f"adapter {n} is not signed"
    )
    assert same.adapter is None and why == "adapter menu is not signed"
