"""`slmops demo`: the whole loop on embedded defaults (grows as stages land)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slmops.cli._output import emit_json, handled, out_console

DEMO_NAME = "slmops-demo"
DEMO_VERSION = "1.0.0"
DEMO_PROFILES = ["arm-gateway-2gb", "rpi5-8gb", "x86-minipc-16gb"]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


def demo_command(
    workdir: Annotated[
        Path, typer.Option("--workdir", "-w", help="where the demo writes everything")
    ] = Path("slmops-demo"),
    minutes: Annotated[float, typer.Option(help="demo model training budget")] = 3.0,
    seed: Annotated[int, typer.Option(help="seed for the demo model")] = 0,
    fleet: Annotated[
        bool, typer.Option("--fleet/--no-fleet", help="run the fleet part (server, agents)")
    ] = True,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="leave the server and agents up until Ctrl-C")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop: train the demo model, optimize it, evaluate it on three device profiles,
    bundle, sign and verify it, then run a local fleet (server, three agents) through a staged
    rollout, a broken version rolled back at the canary, and a chat completion."""
    from slmops.cli.evaluate import print_selection, run_evaluation
    from slmops.cli.model import build_demo
    from slmops.cli.optimize import default_recipe_path, optimize, print_variant_table
    from slmops.evaluate.profiles import resolve_profiles
    from slmops.evaluate.runner import EvalOptions

    with handled(as_json):
        if not as_json:
            out_console.rule("[bold]1. demo model[/]")
        res = build_demo(workdir / "model", minutes, seed, None, "small", as_json)
        if not as_json:
            state = "reused from cache" if res.cached else f"trained in {res.train_seconds:.0f} s"
            out_console.print(
                f"{res.path}: {res.parameters / 1e6:.1f} M parameters, {state}, "
                f"held-out perplexity {res.heldout_perplexity:.1f}"
            )
            out_console.rule("[bold]2. optimize (recipe edge-default)[/]")
        run = optimize(res.path, workdir / "variants", default_recipe_path(), None, None, as_json)
        if not as_json:
            print_variant_table(run)
            out_console.rule(f"[bold]3. evaluate on {', '.join(DEMO_PROFILES)}[/]")
        profiles = resolve_profiles(DEMO_PROFILES)
        report = run_evaluation(
            workdir / "variants", profiles, workdir / "report", EvalOptions(), as_json
        )
        if not as_json:
            print_selection(report)
            out_console.print(
                f"report: [bold]{workdir / 'report' / 'report.html'}[/] ({report.wall_time_s:.0f} s)"
            )
            out_console.rule("[bold]4. bundle, sign, verify[/]")
        bundled = bundle_sign_verify(workdir)
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
                workdir, bundled, model=res.path, keep_running=keep_running, as_json=as_json
            )
        if as_json:
            emit_json(
                {
                    "model": str(res.path),
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


def bundle_sign_verify(workdir: Path) -> dict[str, str]:
    """Bundle, sign, verify. The demo owns its workdir, so a bundle an earlier demo left with
    other content (another seed, say) is replaced rather than refused."""
    import shutil

    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import init_keys, sign_bundle
    from slmops.bundle.verify import verify_bundle
    from slmops.core.errors import UserInputError

    keys = workdir / "keys"
    private, public = keys / "slmops.key", keys / "slmops.pub"
    if not private.exists():
        private, public = init_keys(keys)
    out = workdir / "bundle"
    args = (workdir / "variants", workdir / "report")
    try:
        built = build_bundle(*args, name=DEMO_NAME, version=DEMO_VERSION, out=out)
    except UserInputError:
        shutil.rmtree(out, ignore_errors=True)
        built = build_bundle(*args, name=DEMO_NAME, version=DEMO_VERSION, out=out)
    sign_bundle(out, private)
    verified = verify_bundle(out, [public])
    return {
        "path": str(out),
        "digest": verified.digest,
        "public_key": str(public),
        "name": built.name,
        "version": built.version,
    }
