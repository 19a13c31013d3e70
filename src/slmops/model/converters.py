"""Where the converters live and which architectures they know, without importing them.

`convert_hf_to_gguf.py` ships inside llama-cpp-python's sdist (vendor/llama.cpp), not in the
wheel. The Makefile extracts it (with its `conversion/` and `gguf-py/` packages, which must match
the converter's version) into `<venv>/share/slmops/llama.cpp`; SLMOPS_LLAMA_CPP_DIR overrides.
The architecture lists are read from the sources (registration decorators, builder comparisons)
because importing either tool pulls torch, and `slmops model info` must stay fast.
"""

from __future__ import annotations

import ast
import functools
import os
import re
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


# ---- what the converters know (read from their sources, never imported) --------------------


@functools.cache
def llama_cpp_architectures() -> frozenset[str]:
    """Names in `@ModelBase.register("...")` of the vendored convert_hf_to_gguf (+ conversion/)."""
    try:
        root = llama_cpp_dir()
    except ToolError as exc:
        raise OSError(exc.message) from None
    files = [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]
    names: set[str] = set()
    for f in files:
        if not f.exists():
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr == "register"
                ):
                    names.update(
                        a.value
                        for a in dec.args
                        if isinstance(a, ast.Constant) and isinstance(a.value, str)
                    )
    return frozenset(names)


@functools.cache
def onnx_genai_architectures() -> frozenset[str]:
    """Architecture names onnxruntime-genai's model builder compares `config.architectures[0]`
    against, read from builder.py's source (importing it would import torch)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("onnxruntime_genai is not installed")
    builder = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    text = builder.read_text(encoding="utf-8")
    names: set[str] = set()
    for line in text.splitlines():
        if "architectures" in line or re.search(r"\bin\s*[\[(]", line) or "==" in line:
            names.update(
                re.findall(r"[\"']([A-Z]\w*For(?:CausalLM|ConditionalGeneration))[\"']", line)
            )
    return frozenset(names)
