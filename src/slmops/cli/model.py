"""`slmops model demo` and `slmops model info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slmops.cli._output import console, emit_json, handled, human_bytes, out_console
from slmops.model.demo import DemoResult

app = typer.Typer(
    help="Model utilities: build the demo model, show a model's lineage.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


def build_demo(
    out: Path, minutes: float, seed: int, steps: int | None, size: str, quiet: bool
) -> DemoResult:
    from slmops.model.demo import train_demo_model

    with Progress(
        TextColumn("training demo model"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        task: list[Any] = []  # created at the first step, so a cached model shows no bar

        def on_step(step: int, total: int, loss: float) -> None:
            if not task:
                task.append(progress.add_task("train", total=total, loss="-"))
            progress.update(task[0], completed=step, total=total, loss=f"{loss:.3f}")
            # Without a terminal (CI logs) the bar is not redrawn; print a line every 10%.
            if not quiet and not console.is_terminal and step % max(1, total // 10) == 0:
                console.print(f"  training step {step}/{total}, loss {loss:.3f}")

        return train_demo_model(
            out, minutes=minutes, seed=seed, steps=steps, size=size, progress=on_step
        )


@app.command("demo")
def demo_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the HF model folder")],
    minutes: Annotated[
        float, typer.Option(help="training budget in minutes (converted to a fixed step count)")
    ] = 3.0,
    seed: Annotated[
        int, typer.Option(help="random seed; same seed and budget give the same weights")
    ] = 0,
    steps: Annotated[
        int | None, typer.Option(help="train exactly this many steps (overrides --minutes)")
    ] = None,
    size: Annotated[
        str, typer.Option(help="small (6.8 M parameters) or tiny (for tests)")
    ] = "small",
    as_json: JsonOpt = False,
) -> None:
    """Train the demo model on the standard library's docstrings (offline, cached by seed and budget)."""
    with handled(as_json):
        res = build_demo(out, minutes, seed, steps, size, as_json)
        info = {
            "path": str(res.path),
            "cached": res.cached,
            "parameters": res.parameters,
            "steps": res.steps,
            "train_seconds": res.train_seconds,
            "heldout_perplexity": res.heldout_perplexity,
            "heldout_text": str(res.path / "heldout.txt"),
        }
        if as_json:
            emit_json(info)
            return
        state = "reused from cache" if res.cached else f"trained in {res.train_seconds:.0f} s"
        out_console.print(
            f"demo model [bold]{res.path}[/]: {res.parameters / 1e6:.1f} M parameters, {res.steps} steps, "
            f"{state}; held-out perplexity {res.heldout_perplexity:.1f} ({res.path / 'heldout.txt'})"
        )


@app.command("info")
def model_info(
    path: Annotated[Path, typer.Argument(help="a model folder (HF, GGUF or ONNX GenAI variant)")],
    as_json: JsonOpt = False,
) -> None:
    """Show a model's format, size and lineage card."""
    with handled(as_json):
        from slmops.model.handle import open_model, weights_bytes

        m = open_model(path)
        card = m.card
        info = {
            "path": str(m.path),
            "format": m.format.value,
            "weights_bytes": weights_bytes(m.path),
            "card": card.model_dump(mode="json", by_alias=True) if card else None,
        }
        facts = _arch_facts(m)
        info.update(facts)
        if as_json:
            emit_json(info)
            return
        out_console.print(
            f"[bold]{m.path}[/]: {m.format.value}, weights {human_bytes(weights_bytes(m.path))}"
        )
        _print_arch_facts(facts)
        if card is None:
            out_console.print("  no lineage card (an original model)")
            return
        out_console.print(
            f"  digest {card.digest}\n  origin {card.origin_digest} ({card.origin_path})"
        )
        for i, s in enumerate(card.chain, 1):
            out_console.print(
                f"  {i}. {s.pass_name} v{s.pass_version} {s.config} -> {human_bytes(s.output_bytes)} "
                f"in {s.wall_time_s:.1f} s, peak RSS {human_bytes(s.peak_rss_bytes)}"
            )
        if card.sparsity:
            out_console.print(
                f"  sparsity: {card.sparsity.get('overall')} ({card.sparsity.get('method', '')})"
            )
        if card.structure:
            out_console.print(
                f"  structure: {card.structure.get('target')} -> {card.structure.get('after')}"
            )


def _arch_facts(m: Any) -> dict[str, Any]:
    """Architecture facts and per-pass applicability (HF models only)."""
    from slmops.model.handle import ModelFormat

    if m.format is not ModelFormat.HF:
        return {}
    from slmops.optimize.passes.base import applicability

    arch = m.arch()
    checks = applicability(arch)
    return {
        "arch": arch.to_dict(),
        "passes": {k: {"applies": not v, "why_not": v} for k, v in checks.items()},
    }


def _print_arch_facts(facts: dict[str, Any]) -> None:
    if not facts:
        return
    from slmops.model.arch import ArchInfo, describe_arch

    data = {k: v for k, v in facts["arch"].items() if k != "padded_vocab"}
    for label, value in describe_arch(ArchInfo(**data)):
        out_console.print(f"  {label}: {value}")
    for name, res in facts["passes"].items():
        why = "; ".join(res["why_not"])
        verdict = "[green]applies[/]" if res["applies"] else f"[red]no[/]: {why}"
        out_console.print(f"  pass {name}: {verdict}")


@app.command("dequantize")
def dequantize_command(
    gguf: Annotated[Path, typer.Argument(help="a .gguf file (or a folder holding exactly one)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the Hugging Face folder to create")],
    dtype: Annotated[
        str,
        typer.Option(
            help="weight dtype written: auto (float32 up to 1.5 B parameters, else bfloat16), "
            "float32, bfloat16 or float16"
        ),
    ] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Write a Hugging Face folder (safetensors + tokenizer) from a GGUF, to serve as reference."""
    with handled(as_json):
        from slmops.cli.importer import run_and_print
        from slmops.model.importer import dequantize_gguf

        run_and_print(as_json, lambda say: dequantize_gguf(gguf, out, dtype=dtype, progress=say))
