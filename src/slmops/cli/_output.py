"""Output for humans (rich, on stderr for progress) and machines (--json, one document on stdout).

Every command takes --json; errors are rendered here and only here, with exit code 2 for bad
input and 1 for a failed gate, check or tool.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from slmops.core.errors import SlmopsError
from slmops.core.units import fmt_bytes


def _console(stderr: bool) -> Console:
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        # Logs and pipes get rich's 80-column default otherwise, which wraps every table.
        c = Console(stderr=stderr, highlight=False, width=120)
    return c


console = _console(stderr=True)
out_console = _console(stderr=False)

T = TypeVar("T")


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(exc: SlmopsError, as_json: bool) -> NoReturn:
    if as_json:
        emit_json({"ok": False, **exc.to_dict()})
    else:
        console.print(
            f"[bold red]error:[/] {exc.where + ': ' if exc.where else ''}{exc.message}",
            soft_wrap=True,
        )
        if exc.hint:
            console.print(f"[yellow]hint:[/] {exc.hint}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextmanager
def handled(as_json: bool) -> Iterator[None]:
    """Turn slmops errors (and Ctrl-C) into clean output and the right exit code."""
    try:
        yield
    except SlmopsError as exc:
        fail(exc, as_json)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: nothing half-written was kept")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if os.environ.get("SLMOPS_DEBUG"):
            raise
        err = SlmopsError(
            f"internal error: {type(exc).__name__}: {exc}",
            hint="this is a bug in slmops; rerun with SLMOPS_DEBUG=1 for the traceback and report it",
        )
        fail(err, as_json)


def run_command(as_json: bool, fn: Callable[[], T]) -> T:
    with handled(as_json):
        return fn()
    raise AssertionError("unreachable")  # pragma: no cover


human_bytes = fmt_bytes  # one byte formatter for the CLI, reports and dashboard (core/units)
