"""Helpers shared by the test modules (tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from slmops.model.handle import open_model
from slmops.optimize.passes.base import PassResult, build_pass


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `slmops ARGS` in a fresh interpreter, as a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "slmops.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def run_pass(name: str, options: dict[str, Any], src: Path, out: Path) -> PassResult:
    """Apply one pass directly (no engine, no cache) into a fresh folder `out`."""
    out.mkdir(parents=True)
    p = build_pass(name, options)
    p.prepare()
    return p.run(open_model(src), out)


def run_pass_in(
    name: str, options: dict[str, Any], src: Path, tmp_path: Path
) -> tuple[PassResult, Path]:
    out = tmp_path / "out"
    return run_pass(name, options, src, out), out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (servers under test bind it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
