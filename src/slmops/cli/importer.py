"""`slmops import`: a downloaded GGUF, ONNX GenAI or HF folder becomes a carded variant."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from slmops.cli._output import console, emit_json, handled, human_bytes, out_console

if TYPE_CHECKING:
    from slmops.model.importer import ImportResult
    from slmops.model.importer import Progress as ProgressFn

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]


@contextmanager
def phases(quiet: bool) -> Iterator[ProgressFn]:
    """A spinner whose text follows the importer's phases (hashing, linking, dequantizing)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task("starting", total=None)

        def say(msg: str) -> None:
            progress.update(task, description=msg)
            if not quiet and not console.is_terminal:
                console.print(f"  {msg}")

        yield say


def _how(res: ImportResult) -> str:
    if res.card.chain and res.card.chain[-1].pass_name == "dequantize":
        return "dequantized to " + str((res.card.origin or {}).get("dequantized_to"))
    return "hard-linked" if res.linked else "copied"


def print_result(res: ImportResult) -> None:
    origin = res.card.origin or {}
    out_console.print(
        f"[bold]{res.path}[/]: {res.format} variant [bold]{res.name}[/], "
        f"{human_bytes(res.card.size_bytes)}, {_how(res)} in {res.wall_time_s:.1f} s"
    )
    out_console.print(
        f"  origin {origin.get('file')} ({origin.get('format')}): architecture "
        f"{origin.get('architecture')}, quantization {origin.get('quantization') or '-'}"
        + (f", {origin['parameters'] / 1e6:.1f} M parameters" if origin.get("parameters") else "")
    )
    if origin.get("sha256"):
        out_console.print(f"  sha256 {origin['sha256']}")
    if types := origin.get("tensor_types"):
        out_console.print("  tensor types: " + ", ".join(f"{k} x{v}" for k, v in types.items()))
    if note := origin.get("reference_note"):
        out_console.print(f"  [yellow]{note}[/]")


def run_and_print(as_json: bool, work: Callable[[ProgressFn], ImportResult]) -> None:
    """Run an import (`slmops import`, `slmops model dequantize`) under the phase spinner, then
    print its result: one JSON document with --json, else the human summary."""
    with phases(as_json) as say:
        res = work(say)
    if as_json:
        emit_json(res.to_dict())
    else:
        print_result(res)


def import_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="a .gguf file, a folder holding one, an ONNX GenAI folder or a Hugging Face folder"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="the variant folder to create")],
    name: Annotated[
        str | None, typer.Option(help="variant name (default: the file or folder name)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a model you already have as a variant (carded, so it evaluates, bundles and ships)."""
    with handled(as_json):
        from slmops.model.importer import import_model

        run_and_print(as_json, lambda say: import_model(source, out, name=name, progress=say))
