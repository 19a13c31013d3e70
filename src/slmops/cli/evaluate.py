"""`slmops profiles`, `slmops evaluate` and `slmops gate`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from slmops.cli._output import console, emit_json, handled, human_bytes, out_console
from slmops.evaluate.profiles import DeviceProfile
from slmops.evaluate.schema import EvalReport, Stat

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
ProfileFiles = Annotated[
    list[Path] | None,
    typer.Option("--profile-file", help="YAML file with extra device profiles (repeatable)"),
]


def profiles_command(profile_file: ProfileFiles = None, as_json: JsonOpt = False) -> None:
    """List device profiles: the built-in catalog plus any --profile-file."""
    with handled(as_json):
        from slmops.evaluate.profiles import catalog

        profs = list(catalog(profile_file).values())
        if as_json:
            emit_json([p.model_dump(mode="json") for p in profs])
            return
        t = Table(title="device profiles (RAM = what the model may use)")
        for col in (
            "name",
            "cores",
            "RAM",
            "context",
            "runtimes",
            "TTFT <=",
            "decode >=",
            "KLD <=",
            "speed x host",
            "source",
        ):
            t.add_column(col, no_wrap=col == "name")
        for p in profs:
            t.add_row(
                p.name,
                str(p.cores),
                f"{p.ram_mb} MB",
                str(p.context_length),
                ", ".join(p.runtimes),
                f"{p.budgets.max_ttft_ms:.0f} ms",
                f"{p.budgets.min_decode_tps:g} tok/s",
                f"{p.budgets.max_kld:g}",
                f"{p.relative_speed:g}",
                p.source,
            )
        out_console.print(t)


class _Progress:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("evaluate", total=0)

    def phase(self, name: str, total: int) -> None:
        self.progress.update(self.task, description=name, total=total, completed=0)

    def advance(self, description: str) -> None:
        self.progress.advance(self.task)
        self.progress.console.print(f"  {description}")


def run_evaluation(
    variants: Path,
    profiles: list[DeviceProfile],
    out: Path,
    options: object,
    quiet: bool,
) -> EvalReport:
    from slmops.evaluate.runner import EvalOptions, evaluate

    assert isinstance(options, EvalOptions)
    with evaluation_progress(quiet) as listener:
        return evaluate(variants, profiles, out, options, listener)


@contextmanager
def evaluation_progress(quiet: bool) -> Iterator[_Progress]:
    """A progress bar over an evaluation's phases (shared by `evaluate`, the demo, releases)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        yield _Progress(progress)


def evaluate_command(
    variants: Annotated[
        Path, typer.Argument(help="the --out folder of `slmops optimize` (or one variant)")
    ],
    profiles: Annotated[
        str, typer.Option("--profiles", "-p", help="comma-separated profile names or YAML files")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="report folder (report.json/.md/.html, charts/)")
    ],
    reference: Annotated[
        Path | None, typer.Option(help="original HF model (default: from the variants' cards)")
    ] = None,
    eval_text: Annotated[
        Path | None, typer.Option(help="held-out text (default: REFERENCE/heldout.txt)")
    ] = None,
    tasks: Annotated[
        Path | None, typer.Option(help="JSONL task suite: prompt, expected, match")
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, max=20, help="performance repeats per variant x profile")
    ] = 3,
    max_tokens: Annotated[
        int, typer.Option(min=8, max=2048, help="tokens decoded per performance run")
    ] = 64,
    min_decode_s: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=60.0,
            help="seconds of decoding summed per performance repeat (several runs of "
            "--max-tokens when one is shorter), so one preemption cannot swing the figure",
        ),
    ] = 0.3,
    windows: Annotated[int, typer.Option(min=1, max=1000, help="quality windows scored")] = 24,
    baseline_tokens: Annotated[
        int,
        typer.Option(
            min=0,
            max=1024,
            help="greedy tokens per prompt for the field baseline (logprob, length); 0: none",
        ),
    ] = 64,
    window_tokens: Annotated[
        int, typer.Option(min=16, max=8192, help="tokens per quality window")
    ] = 128,
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="evaluate only these variants")
    ] = None,
    cloud_price: Annotated[
        float | None, typer.Option(help="cloud API USD per million output tokens")
    ] = None,
    tie_kld: Annotated[
        float,
        typer.Option(
            min=0.0, help="KLD difference below which variants tie (smaller, then faster wins)"
        ),
    ] = 0.002,
    profile_file: ProfileFiles = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure every variant's quality and speed/memory on device profiles; select the best fit."""
    with handled(as_json):
        from slmops.evaluate.profiles import resolve_profiles
        from slmops.evaluate.runner import EvalOptions

        profs = resolve_profiles(profiles, profile_file)
        opts = EvalOptions(
            reference=reference,
            eval_text=eval_text,
            tasks=tasks,
            repeats=repeats,
            max_tokens=max_tokens,
            min_decode_s=min_decode_s,
            windows=windows,
            window_tokens=window_tokens,
            baseline_tokens=baseline_tokens,
            cloud_usd_per_million=cloud_price,
            tie_kld=tie_kld,
            only=variant or [],
        )
        report = run_evaluation(variants, profs, out, opts, as_json)
        if as_json:
            emit_json(report.model_dump(mode="json", by_alias=True))
            return
        print_selection(report)
        out_console.print(f"report: [bold]{out / 'report.html'}[/] ({report.wall_time_s:.0f} s)")


def _with_spread(value: float | None, stat: Stat | None, unit: str) -> str:
    """'812 (4% spread)' over repeats, '[yellow]812 (23% spread, unstable)[/]' above 10 %, or '-'."""
    if not value:
        return "-"
    text = f"{value:.0f}{unit}"
    if stat is None or stat.n < 2:
        return text
    if stat.unstable:
        return f"[yellow]{text} ({stat.spread:.0%} spread, unstable)[/]"
    return f"{text} ({stat.spread:.0%} spread)"


def print_selection(report: EvalReport) -> None:
    t = Table(
        title="selection per device profile (speed projected from host measurements: estimates)"
    )
    for col in (
        "profile",
        "chosen variant",
        "KLD",
        "top-1",
        "size",
        "tok/s (proj.)",
        "TTFT (proj.)",
        "fits",
        "$/M tok",
    ):
        t.add_column(col, no_wrap=col in ("profile", "chosen variant"))
    for sel in report.selections:
        fits = sum(1 for v in report.verdicts if v.profile == sel.profile and v.fits)
        cost = next((c for c in report.costs if c.profile == sel.profile), None)
        if sel.variant is None:
            t.add_row(
                sel.profile,
                "[red]none fits[/]",
                "",
                "",
                "",
                "",
                "",
                f"0/{len(report.variants)}",
                "",
            )
            continue
        q = report.quality[sel.variant]
        p = report.perf_for(sel.variant, sel.profile)
        info = next(v for v in report.variants if v.name == sel.variant)
        t.add_row(
            sel.profile,
            sel.variant,
            f"{q.kld_mean:.4f}",
            f"{q.top1_agreement:.3f}",
            human_bytes(info.weights_bytes),
            _with_spread(p.projected_decode_tps, p.decode_tps, "") if p else "-",
            _with_spread(p.projected_ttft_ms, p.ttft_ms, " ms") if p else "-",
            f"{fits}/{len(report.variants)}",
            f"{cost.device_usd_per_million_tokens:.3f}"
            if cost and cost.device_usd_per_million_tokens is not None
            else "-",
        )
    out_console.print(t)
    for sel in report.selections:
        out_console.print(f"  {sel.profile}: {sel.reason}")


def gate_command(
    report_dir: Annotated[
        Path, typer.Argument(help="a report folder written by `slmops evaluate`")
    ],
    baseline: Annotated[
        Path | None, typer.Option(help="an earlier report folder to compare against")
    ] = None,
    max_kld_increase: Annotated[
        float, typer.Option(min=0.0, help="allowed KLD increase of a profile's pick")
    ] = 0.01,
    require: Annotated[
        str | None, typer.Option(help="comma-separated profiles that must have a fit")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """CI gate: exit 1 if a required profile has no fitting variant or quality regressed."""
    with handled(as_json):
        from slmops.evaluate.gate import gate, load_report

        rep = load_report(report_dir)
        base = load_report(baseline) if baseline else None
        req = [r.strip() for r in require.split(",") if r.strip()] if require else None
        result = gate(rep, baseline=base, max_kld_increase=max_kld_increase, required=req)
        if as_json:
            emit_json(result.to_dict())
        else:
            for c in result.checks:
                mark = "[green]pass[/]" if c["ok"] else "[red]FAIL[/]"
                out_console.print(f"{mark} {c['name']}: {c['detail']}")
            out_console.print(
                "[bold green]gate passed[/]" if result.ok else "[bold red]gate failed[/]"
            )
        if not result.ok:
            raise typer.Exit(1)
