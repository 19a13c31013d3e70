"""llama.cpp's log: quiet by default (errors kept), everything with SLMOPS_LLAMA_LOG=1.

Each case loads a real tiny GGUF in a fresh interpreter, because llama.cpp's log callback is
process-wide state and the thing under test is what reaches the process's stderr (fd 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.model.handle import open_model
from slmops.optimize.passes.base import build_pass

LOAD = """
import sys
from pathlib import Path
from slmops.core.errors import ModelFormatError
from slmops.runtimes.llama_cpp import LlamaCppRuntime

try:
    rt = LlamaCppRuntime(Path(sys.argv[1]), 1, 64)
except ModelFormatError as exc:
    print("ERROR " + str(exc))
else:
    toks, _ = rt.generate([rt.bos_id or 0, 5, 6], 4, stop_at_eos=False)
    rt.close()
    print(f"OK {len(toks)}")
"""


@pytest.fixture(scope="module")
def gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama-log") / "gguf"
    out.mkdir()
    p = build_pass("export-gguf", {"outtype": "f16"})
    p.prepare()
    p.run(open_model(tiny_model), out)
    return out


def _load(model: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "SLMOPS_LLAMA_LOG"} | env
    return subprocess.run(
        [sys.executable, "-c", LOAD, str(model)],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
        check=True,
    )


def test_load_is_quiet_by_default(gguf: Path) -> None:
    proc = _load(gguf)
    assert proc.stdout.strip() == "OK 4"
    assert proc.stderr.strip() == "", proc.stderr[:2000]


def test_env_var_brings_llama_cpp_info_lines_back(gguf: Path) -> None:
    proc = _load(gguf, SLMOPS_LLAMA_LOG="1")
    assert proc.stdout.strip() == "OK 4"
    # info lines from the loader and the context, which the default hides
    assert "llama_model_loader: " in proc.stderr
    assert "llama_context: " in proc.stderr


def test_load_errors_reach_stderr_and_the_exception(gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    proc = _load(bad)
    # llama-cpp-python's own callback (outdated level table) dropped exactly these lines
    assert "invalid magic characters" in proc.stderr
    assert proc.stdout.startswith("ERROR ") and "invalid magic characters" in proc.stdout
    assert "llama_model_loader: - kv" not in proc.stderr  # still no info chatter
