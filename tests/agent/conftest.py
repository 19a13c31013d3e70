"""Real signed bundles for agent tests: the tiny model -> GGUF variants -> bundles 1.0.0 / 1.1.0.

Built once per session with the real optimizer (lineage cards written by the engine), the real
bundle builder and real ed25519 keys. 1.0.0 holds a Q8_0 variant, 1.1.0 a Q4_0 one, so the two
versions differ in content. Each version gets a minimal real evaluation report (one generous
device profile, 2 windows, 1 repeat) so the bundles are what `slmops bundle` ships.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from slmops.bundle.layout import Index, OciLayout, parse_model
from slmops.bundle.media import ANN_VARIANT, MT_INDEX
from slmops.protocol.device import DesiredModel

RECIPE = """\
name: agent-test
variants:
  %s:
    - export-gguf: {outtype: f16}
    - quantize-gguf: {type: %s}
"""
NAME = "acme/bot"


@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path
    pub: Path  # the signer's public key (trusted)
    other_pub: Path  # a key that signed nothing
    priv: Path  # the signer's private key


def desired_for(bundle: Path, version: str, rollout_id: str | None = "r1") -> DesiredModel:
    """The DesiredModel a control plane would send for the bundle's only variant."""
    layout = OciLayout(bundle)
    root = next(d for d in layout.read_index().manifests if d.media_type == MT_INDEX)
    index = parse_model(Index, json.loads(layout.blob_path(root.digest).read_bytes()), where="t")
    entry = next(d for d in index.manifests if d.annotation(ANN_VARIANT))
    return DesiredModel(
        name=NAME,
        version=version,
        variant=str(entry.annotation(ANN_VARIANT)),
        bundle_digest=root.digest,
        manifest_digest=entry.digest,
        repository=NAME,
        rollout_id=rollout_id,
    )


EVALUATE = """
import sys
from pathlib import Path
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.runner import EvalOptions, evaluate

reference, variants, out = map(Path, sys.argv[1:4])
profile = DeviceProfile.model_validate(
    {
        "name": "test-box",
        "arch": "x86_64",
        "cores": 2,
        "ram_mb": 4096,
        "storage_mb": 32768,
        "runtimes": ["gguf"],
        "context_length": 256,
        "relative_speed": 1.0,
        "budgets": {"max_ttft_ms": 100000, "min_decode_tps": 0.1, "max_kld": 100},
        "cost": {"hardware_usd": 80, "lifetime_years": 5, "power_watts": 7},
    }
)
options = EvalOptions(
    reference=reference, repeats=1, max_tokens=8, windows=2, window_tokens=64,
    greedy_prompts=1, threads=1,
)
evaluate(variants, [profile], out, options)
"""


def _evaluate(reference: Path, variants: Path, out: Path) -> None:
    """A minimal real evaluation (one generous device profile) in a child process.

    Why a child: evaluate() imports the `gguf` package from PyPI, and an in-process GGUF export
    run later in the same session (another test module's fixture) then picks it up instead of
    the converter's own and fails (`gguf` has no LazyChunkedTensor).
    """
    args = [str(reference), str(variants), str(out)]
    subprocess.run([sys.executable, "-c", EVALUATE, *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def bundles(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import init_keys, sign_bundle
    from slmops.optimize.engine import run_recipe
    from slmops.optimize.recipe import load_recipe

    root = tmp_path_factory.mktemp("agent-bundles")
    priv, pub = init_keys(root / "keys", "fleet")
    _, other_pub = init_keys(root / "keys", "other")
    out: dict[str, Path] = {}
    for version, variant, qtype in (("1.0.0", "gguf-q8_0", "Q8_0"), ("1.1.0", "gguf-q4_0", "Q4_0")):
        recipe = root / f"{variant}.yaml"
        recipe.write_text(RECIPE % (variant, qtype))
        variants = root / f"variants-{version}"
        run_recipe(tiny_model, load_recipe(recipe), variants, cache_dir=root / "cache")
        report = root / f"report-{version}"
        _evaluate(tiny_model, variants, report)
        bundle = root / f"bundle-{version}"
        build_bundle(variants, report, name=NAME, version=version, out=bundle)
        sign_bundle(bundle, priv)
        out[version] = bundle
    return Bundles(out["1.0.0"], out["1.1.0"], pub, other_pub, priv)


@pytest.fixture(scope="session")
def desired() -> Callable[[Path, str], DesiredModel]:
    return desired_for


@dataclass(frozen=True)
class FleetBundles:
    """Bundles holding two variants each (Q8_0 and Q4_0, evaluated), so devices with different
    RAM budgets and profiles resolve different variants; plus a signed version whose weights
    cannot load."""

    v1: Path  # 1.0.0
    v2: Path  # 1.0.1: the same weights as 1.0.0 in other variant manifests
    broken: Path  # 1.1.0: weights truncated (demo_fleet.make_broken_bundle)
    pub: Path


def _merged_report(root: Path, out: Path) -> None:
    """One evaluation report over both variants, from the two the `bundles` fixture made.

    The tiny model's variants measure within noise of each other (peak RSS ~61 MiB each, under
    1 MiB apart, and a device reports its RAM budget in MiB), so two figures are set to make the
    placement deterministic: Q8_0 needs 64 MiB more than Q4_0, and the evaluation picks Q4_0 for
    the `test-box` profile.
    """
    first = json.loads((root / "report-1.0.0" / "report.json").read_text())
    second = json.loads((root / "report-1.1.0" / "report.json").read_text())
    for key in ("variants", "perf", "verdicts"):
        first[key] += second[key]
    first["quality"] |= second["quality"]
    for perf in first["perf"]:
        rss = perf.get("peak_rss_bytes")
        if perf["variant"] == "gguf-q8_0" and rss:
            perf["peak_rss_bytes"] = {
                k: v + 64 * 2**20 if isinstance(v, int | float) and k != "n" else v
                for k, v in rss.items()
            }
    first["selections"] = [{"profile": "test-box", "variant": "gguf-q4_0", "reason": "test"}]
    first["costs"] = []
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(first, indent=2))


@pytest.fixture(scope="session")
def fleet_bundles(bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> FleetBundles:
    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import sign_bundle
    from slmops.cli.demo_fleet import BROKEN_VERSION, make_broken_bundle
    from slmops.model.card import CARD_FILE, read_card

    built_in = bundles.v1.parent
    root = tmp_path_factory.mktemp("fleet-bundles")
    variants = root / "variants"  # where make_broken_bundle looks
    for version, variant in (("1.0.0", "gguf-q8_0"), ("1.1.0", "gguf-q4_0")):
        src = built_in / f"variants-{version}" / variant
        shutil.copytree(src, variants / variant, copy_function=os.link)
    report = root / "report"
    _merged_report(built_in, report)
    # 1.0.1 ships the same weights with re-dated lineage cards: other variant manifests, so
    # devices really install it (an unchanged variant keeps its digest across versions)
    later = root / "variants-1.0.1"
    shutil.copytree(variants, later, copy_function=shutil.copy2)
    for card_path in later.rglob(CARD_FILE):
        card = read_card(card_path.parent)
        assert card is not None
        card.model_copy(update={"created_at": "2030-01-01T00:00:00+00:00"}).write(card_path.parent)
    out: dict[str, Path] = {}
    for version, tree in (("1.0.0", variants), ("1.0.1", later)):
        built = build_bundle(tree, report, name=NAME, version=version, out=root / version)
        sign_bundle(built.path, bundles.priv)
        out[version] = built.path
    assert BROKEN_VERSION == "1.1.0"
    broken = make_broken_bundle(root, root / "broken", bundles.priv, NAME)
    return FleetBundles(out["1.0.0"], out["1.0.1"], broken, bundles.pub)


@pytest.fixture(scope="session")
def api_gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a Q8_0 GGUF folder, shared by the API tests and the API fuzz."""
    from helpers import run_pass

    root = tmp_path_factory.mktemp("api")
    run_pass("export-gguf", {"outtype": "f16"}, tiny_model, root / "f16")
    run_pass("quantize-gguf", {"type": "Q8_0"}, root / "f16", root / "q8")
    return root / "q8"


# --- adapters (tests/agent/test_adapter_*.py) -------------------------------------------


@pytest.fixture(scope="module")
def adapters(
    tiny_model: Path, bundles: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Signed adapter artifacts s1 and s2 for acme/bot:1.0.0, and an unsigned one."""
    from adapter_fixtures import make_adapter
    from slmops.bundle.adapter import build_adapter_bundle
    from slmops.bundle.signing import sign_bundle

    root = tmp_path_factory.mktemp("adapters")
    out: dict[str, Path] = {}
    for site in ("s1", "s2"):
        folder = make_adapter(tiny_model, root / f"adapter-{site}", site)
        built = build_adapter_bundle(
            folder, bundles.v1, name=f"store-{site}", version="1.0.0", out=root / f"art-{site}"
        )
        out[site] = built.path
        if site == "s1":
            unsigned = root / "art-unsigned"
            build_adapter_bundle(folder, bundles.v1, name="store-x", version="1.0.0", out=unsigned)
            out["unsigned"] = unsigned
        sign_bundle(built.path, bundles.priv)
    return out


@pytest.fixture(scope="module")
def model_data(
    bundles: Any,
    desired: Callable[[Path, str], DesiredModel],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A data dir whose agent runs acme/bot:1.0.0 (no adapter): copied by each adapter test."""
    from slmops.agent.fetch import LayoutSource
    from slmops.agent.install import Installer
    from slmops.protocol.fleet import DeviceActionState as S

    data = tmp_path_factory.mktemp("adapter-data") / "data"
    final = Installer(data, [bundles.pub], threads=1).apply(
        desired(bundles.v1, "1.0.0"), LayoutSource(bundles.v1), lambda s: None
    )
    assert final.state is S.ACTIVE, final.detail
    return data


@pytest.fixture
def adapter_plane(tmp_path: Path) -> Iterator[Any]:
    """A real control plane ticking rollouts every 0.2 s with 1 s polls (the adapter suites)."""
    from control_plane import ControlPlane

    cp = ControlPlane(
        tmp_path / "server", {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2", "SLMOPS_POLL_SECONDS": "1"}
    )
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()
