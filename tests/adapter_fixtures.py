"""Builders shared by the adapter suites (tests/bundle, tests/agent): real LoRA adapters trained
with `slmops adapt` on the tiny model, real base bundles, and hand-written GGUF headers for the
shape/rank refusal cases (written with struct: importing PyPI's `gguf` into the test process
would break later in-process GGUF exports, see DESIGN.md)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from slmops.bundle.layout import Index, Manifest, OciLayout, parse_model
from slmops.bundle.media import MT_INDEX, MT_LORA_GGUF
from slmops.protocol.device import DesiredAdapter

SHOPS = {
    "s1": ["espresso", "flat white", "croissant", "bagel", "green tea", "muffin"],
    "s2": ["hammer", "wrench", "drill", "screwdriver", "pliers", "saw"],
}


def site_text(path: Path, site: str, n: int = 40) -> Path:
    rnd = random.Random(site)
    items = SHOPS[site]
    paras = []
    for _ in range(n):
        a, b = rnd.sample(items, 2)
        paras.append(f"Store {site}: the {a} costs {rnd.randint(2, 9)} dollars, the {b} too.")
    path.write_text("\n\n".join(paras))
    return path


def make_adapter(base: Path, out: Path, site: str, *, rank: int = 32, steps: int = 4) -> Path:
    """A real adapter folder (`slmops adapt` in-process, a few steps: content matters less
    than realness here)."""
    from slmops.adapt.run import adapt
    from slmops.adapt.train import TrainOptions

    data = site_text(out.parent / f"{site}.txt", site)
    opts = TrainOptions(steps=steps, minutes=None, seqlen=32, batch=4, threads=1, rank=rank)
    adapt(base, data, out, opts)
    return out


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf_header(
    path: Path, tensors: dict[str, tuple[int, ...]], *, arch: str = "llama"
) -> None:
    """A GGUF v3 file with adapter metadata and tensor records (no tensor data: the checks
    read headers only)."""
    kv = [("general.architecture", arch), ("general.type", "adapter"), ("adapter.type", "lora")]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, value in kv:
        out += _string(key) + struct.pack("<I", 8) + _string(value)
    for name, dims in tensors.items():
        out += _string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", 0, 0)
    path.write_bytes(bytes(out))


def build_base(model: Path, root: Path, priv: Path, version: str = "1.0.0") -> Path:
    """A signed base bundle acme/bot:VERSION with one Q8_0 GGUF variant (no eval report)."""
    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import sign_bundle
    from slmops.optimize.engine import run_recipe
    from slmops.optimize.recipe import load_recipe

    recipe = root / "recipe.yaml"
    recipe.write_text(
        "name: t\nvariants:\n  gguf-q8_0:\n    - export-gguf: {outtype: f16}\n"
        "    - quantize-gguf: {type: Q8_0}\n"
    )
    run_recipe(model, load_recipe(recipe), root / "variants", cache_dir=root / "cache")
    built = build_bundle(
        root / "variants", None, name="acme/bot", version=version, out=root / "base"
    )
    sign_bundle(built.path, priv)
    return built.path


def adapter_desired(layout_dir: Path) -> DesiredAdapter:
    """What the control plane would send for an adapter artifact folder."""
    layout = OciLayout(layout_dir)
    root = next(d for d in layout.read_index().manifests if d.media_type == MT_INDEX)
    index = parse_model(Index, json.loads(layout.blob_path(root.digest).read_bytes()), where="t")
    entry = index.manifests[0]
    m = parse_model(Manifest, json.loads(layout.blob_path(entry.digest).read_bytes()), where="t")
    layer = next(x for x in m.layers if x.media_type == MT_LORA_GGUF)
    name = str(index.annotation("io.slmops.bundle.name"))
    return DesiredAdapter(
        name=name,
        version=str(index.annotation("org.opencontainers.image.version")),
        digest=root.digest,
        manifest_digest=entry.digest,
        layer_digest=layer.digest,
        size=layer.size,
        repository=name,
    )
