"""`slmops passes` and `slmops optimize`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from slmops.cli._output import console, emit_json, handled, human_bytes, out_console
from slmops.optimize.engine import OptimizeRun, StepOutcome

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


def default_recipe_path() -> Path:
    return Path(str(resources.files("slmops.optimize") / "recipes" / "edge-default.yaml"))


def passes_command(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="HF model folder: also say whether each pass applies to it"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List every registered pass with its options and defaults (and, with --model, whether it
    applies to that model and why not)."""
    with handled(as_json):
        from slmops.optimize.passes.base import applicability, registry

        described = [cls.describe() for cls in registry().values()]
        if model is not None:
            from slmops.model.handle import ModelFormat, open_model

            checks = applicability(open_model(model, expect=ModelFormat.HF).arch())
            for d in described:
                d["applies"] = not checks[d["name"]]
                d["why_not"] = checks[d["name"]]
        if as_json:
            emit_json(described)
            return
        for d in described:
            out_console.print(
                f"[bold cyan]{d['name']}[/] (v{d['version']}, {d['kind']}, {d['input']} -> {d['output']})"
            )
            out_console.print(f"  {d['summary']}")
            if "applies" in d:
                verdict = "[green]applies[/]" if d["applies"] else "[red]does not apply[/]: "
                out_console.print(f"  {verdict}" + "; ".join(d["why_not"]))
            for o in d["options"]:
                default = "required" if o["required"] else f"default {o['default']!r}"
                out_console.print(
                    f"    [green]{o['name']}[/]: {o['type']} ({default}) {o['description']}"
                )


class _ProgressListener:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("optimize", total=0)

    def plan(self, total_steps: int) -> None:
        self.progress.update(self.task, total=total_steps)

    def step_started(self, variant: str, index: int, pass_name: str, cached: bool) -> None:
        state = "cached" if cached else "running"
        self.progress.update(
            self.task, description=f"{variant} [{index + 1}] {pass_name} ({state})"
        )

    def step_finished(self, outcome: StepOutcome) -> None:
        self.progress.advance(self.task)
        if not outcome.cached:
            self.progress.console.print(
                f"  [green]done[/] {outcome.variant} step {outcome.index + 1} {outcome.pass_name}: "
                f"{outcome.wall_time_s:.1f} s, peak RSS {human_bytes(outcome.peak_rss_bytes)}, "
                f"output {human_bytes(outcome.output_bytes)}"
            )


def optimize_command(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the variants")],
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", "-r", help="recipe YAML (default: the built-in edge-default)"),
    ] = None,
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="run only these variants")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="step cache (default: OUT/.cache)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a recipe: every variant's chain of passes, cached by step, written atomically."""
    with handled(as_json):
        run = optimize(model, out, recipe or default_recipe_path(), variant, cache_dir, as_json)
        if as_json:
            emit_json(run.to_dict())
        else:
            print_variant_table(run)


def optimize(
    model: Path,
    out: Path,
    recipe_path: Path,
    only: list[str] | None,
    cache_dir: Path | None,
    quiet: bool,
) -> OptimizeRun:
    from slmops.model.handle import ModelFormat, open_model
    from slmops.optimize.engine import run_recipe
    from slmops.optimize.recipe import load_recipe

    open_model(model, expect=ModelFormat.HF)  # a wrong model path is the first thing to report
    recipe = load_recipe(recipe_path)
    with optimize_progress(quiet) as listener:
        return run_recipe(model, recipe, out, cache_dir=cache_dir, listener=listener, only=only)


@contextmanager
def optimize_progress(quiet: bool) -> Iterator[_ProgressListener]:
    """A progress bar over a recipe's steps (shared by `optimize`, the demo and releases)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        yield _ProgressListener(progress)


KIND_LABELS = {
    "prune-unstructured": "sparse",
    "prune-semi-structured": "N:M sparse",
    "prune-structured": "structurally pruned",
}


def print_variant_table(run: OptimizeRun) -> None:
    table = Table(
        title=f"variants of {run.model.name} (recipe {run.recipe}, fp32 size {human_bytes(run.fp32_bytes)})"
    )
    table.add_column("variant", no_wrap=True)
    table.add_column("format", no_wrap=True)
    table.add_column("precision", no_wrap=True)
    table.add_column("pruning")
    table.add_column("weights", justify="right", no_wrap=True)
    table.add_column("x fp32", justify="right")
    table.add_column("compression", justify="right")
    table.add_column("cached")
    for v in run.variants:
        pruning = [KIND_LABELS[k] for k in v.kinds if k in KIND_LABELS] or ["-"]
        table.add_row(
            v.name,
            v.format,
            v.quantization or "-",
            ", ".join(pruning),
            human_bytes(v.weights_bytes),
            f"{v.ratio_to_fp32:.3f}",
            f"{1 / v.ratio_to_fp32:.1f}x" if v.ratio_to_fp32 else "-",
            "yes" if v.cached else "no",
        )
    out_console.print(table)
    out_console.print(f"variants in [bold]{run.out}[/] ({run.wall_time_s:.1f} s)")
