"""Export an adapter for the runtimes: GGUF LoRA for llama.cpp, checked by loading it.

llama.cpp's own `convert_lora_to_gguf.py` ships in the llama-cpp-python sdist next to
convert_hf_to_gguf.py (scripts/install-llama-cpp.sh extracts both with their gguf-py). It runs
in a child interpreter: as a script it puts its own folder first on sys.path, so it imports its
vendored gguf-py rather than the older PyPI `gguf`, and its tensors never share our memory.
It reads only the base's config.json (never its weights or tokenizer) to map tensor names.

ONNX Runtime GenAI: 0.18 can *load* adapters (`onnxruntime_genai.Adapters`, `.onnx_adapter`
files written by onnxruntime's AdapterFormat), but only into a model exported with the LoRA
weights as graph inputs; its model builder's `adapter_path` option bakes the adapter into the
graph as constants instead (a whole new model). So no ONNX adapter is exported here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from slmops.core.errors import ModelFormatError, ToolError
from slmops.model.converters import llama_cpp_dir

LORA_CONVERTER = "convert_lora_to_gguf.py"
GGUF_ADAPTER = "adapter.gguf"


def lora_converter() -> Path:
    tool = llama_cpp_dir() / LORA_CONVERTER
    if not tool.exists():
        raise ToolError(
            f"llama.cpp's {LORA_CONVERTER} was not found",
            where=tool.parent,
            hint="rerun `make install` (scripts/install-llama-cpp.sh extracts it from the "
            "llama-cpp-python sdist next to convert_hf_to_gguf.py)",
        )
    return tool


def export_gguf_lora(adapter_dir: Path, base: Path, outfile: Path, outtype: str = "f32") -> None:
    """PEFT adapter folder -> one GGUF LoRA file for the base's architecture."""
    tool = lora_converter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(tool), "--base", str(base), "--outfile", str(outfile)]
    proc = subprocess.run(
        [*cmd, "--outtype", outtype, str(adapter_dir)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0 or not outfile.exists() or outfile.stat().st_size == 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-8:])
        raise ToolError(f"{LORA_CONVERTER} failed (exit {proc.returncode}): {tail}", where=base)


def gguf_logits(base_gguf: Path, ids: list[int], adapter: Path | None, threads: int = 1) -> Any:
    """Logits of every position from llama.cpp, with or without the LoRA applied."""
    import llama_cpp
    import numpy as np

    from slmops.runtimes.llama_log import install_llama_log

    install_llama_log()  # llama.cpp errors only, unless SLMOPS_LLAMA_LOG=1
    try:
        llm = llama_cpp.Llama(
            model_path=str(base_gguf),
            lora_path=str(adapter) if adapter else None,
            n_ctx=max(64, len(ids) + 1),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        what = f"with adapter {adapter}" if adapter else "alone"
        raise ModelFormatError(
            f"llama.cpp cannot load the base {what}: {exc}",
            where=adapter or base_gguf,
            hint="the adapter must be trained on the same base (architecture and shapes) "
            "the GGUF was exported from",
        ) from None
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)
    finally:
        llm.close()


def verify_gguf(base_gguf: Path, adapter: Path, ids: list[int]) -> dict[str, Any]:
    """Load base + adapter in llama.cpp and check the adapter changes the logits."""
    import numpy as np

    plain = gguf_logits(base_gguf, ids, None)
    adapted = gguf_logits(base_gguf, ids, adapter)
    diff = float(np.abs(plain - adapted).max())
    return {
        "base_gguf": str(base_gguf),
        "loads": True,
        "tokens": len(ids),
        "max_abs_logit_change": round(diff, 5),
        "changes_output": diff > 1e-4,
    }
