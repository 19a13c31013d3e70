"""`slmops adapt`: train a per-site LoRA adapter on CPU, evaluate it against its base, export it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from slmops.cli._output import console, emit_json, handled, human_bytes, out_console
from slmops.core.errors import ConfigError

if TYPE_CHECKING:
    from slmops.adapt.run import AdaptResult
    from slmops.adapt.train import Progress as ProgressFn

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


@contextmanager
def _bar(quiet: bool) -> Iterator[ProgressFn]:
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        task = progress.add_task("loading", total=None)

        def say(msg: str, fraction: float | None) -> None:
            if fraction is None:
                progress.update(task, description=msg, total=None)
            else:
                progress.update(task, description=msg, total=1.0, completed=fraction)

        yield say


def _print(res: AdaptResult) -> None:
    ev, tr = res.evaluation, res.training
    out_console.print(
        f"[bold]{res.path}[/]: LoRA rank {res.card.chain[-1].config['rank']} adapter over {len(tr['target_modules'])} projection "
        f"kinds, {tr['trainable_parameters']:,} trainable parameters, "
        f"{human_bytes(res.card.size_bytes)} in all ({tr['steps']} steps, "
        f"{tr['train_seconds']:.0f} s, stopped by {tr['stopped_by']})"
    )
    out_console.print(
        f"  site perplexity (held-out split): base {ev['site_perplexity_base']:.2f} -> "
        f"adapted {ev['site_perplexity_adapted']:.2f} "
        f"([bold]{ev['site_perplexity_improvement']:.1%}[/] lower)"
    )
    if ev.get("general_kld_to_base") is not None:
        out_console.print(
            f"  forgetting: KLD to the base on {ev['general_text']} {ev['general_kld_to_base']:.4f}"
        )
    out_console.print(
        f"  llama.cpp: adapter.gguf ({human_bytes(ev['gguf_adapter_bytes'])})"
        + (
            f", loaded with {Path(ev['llama_cpp']['base_gguf']).name}: max logit change "
            f"{ev['llama_cpp']['max_abs_logit_change']:.3f}"
            if ev.get("llama_cpp")
            else " (pass --base-gguf to check it loads)"
        )
    )
    out_console.print(f"  base digest {res.card.chain[-1].input_digest}")


def adapt_command(
    base: Annotated[Path, typer.Argument(help="the Hugging Face base model folder")],
    data: Annotated[
        Path,
        typer.Option(
            "--data", help='site text (.txt) or chat examples (.jsonl, {"messages": [...]})'
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="adapter folder to create")],
    minutes: Annotated[
        float | None, typer.Option(help="training time budget (default 5 without --steps)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
    batch: Annotated[int, typer.Option(help="windows per step")] = 8,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 128,
    threads: Annotated[
        int | None, typer.Option(help="torch threads (default: usable CPUs)")
    ] = None,
    general: Annotated[
        Path | None,
        typer.Option(help="general text for the forgetting KLD (default: base's heldout.txt)"),
    ] = None,
    base_gguf: Annotated[
        Path | None,
        typer.Option(help="the base as GGUF: check adapter.gguf loads with it in llama.cpp"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a per-site LoRA adapter on CPU and export it (PEFT + GGUF LoRA), with its evaluation."""
    with handled(as_json):
        from slmops.adapt.run import adapt
        from slmops.adapt.train import TrainOptions

        for name, value in (("--minutes", minutes), ("--steps", steps), ("--rank", rank)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive", where=name, hint="for example 8")
        for name, value in (("--lr", lr), ("--batch", batch), ("--seqlen", seqlen)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive", where=name)
        opts = TrainOptions(
            steps=steps,
            minutes=minutes if minutes is not None or steps is not None else 5.0,
            rank=rank,
            lr=lr,
            batch=batch,
            seqlen=seqlen,
            threads=threads,
        )
        with _bar(as_json) as say:
            res = adapt(base, data, out, opts, general=general, base_gguf=base_gguf, progress=say)
        if as_json:
            emit_json(res.to_dict())
        else:
            _print(res)
