"""Where llama.cpp's own Python tools live and how to call them in-process.

`convert_hf_to_gguf.py` ships inside llama-cpp-python's sdist (vendor/llama.cpp), not in the
wheel. The Makefile extracts it (with its `conversion/` and `gguf-py/` packages, which must match
the converter's version) into `<venv>/share/slmops/llama.cpp`; SLMOPS_LLAMA_CPP_DIR overrides.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from slmops.core.errors import ToolError

CONVERTER = "convert_hf_to_gguf.py"


def llama_cpp_dir() -> Path:
    candidates = []
    if env := os.environ.get("SLMOPS_LLAMA_CPP_DIR"):
        candidates.append(Path(env))
    candidates.append(Path(sys.prefix) / "share" / "slmops" / "llama.cpp")
    for c in candidates:
        if (c / CONVERTER).exists():
            return c
    raise ToolError(
        f"llama.cpp's {CONVERTER} was not found (looked in: {', '.join(map(str, candidates))})",
        hint="run `make install` (it extracts the converter from the llama-cpp-python sdist), "
        "or set SLMOPS_LLAMA_CPP_DIR to a llama.cpp checkout of the same version as llama-cpp-python",
    )
