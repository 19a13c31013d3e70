"""Where llama.cpp's own Python tools live (kept here for the passes; see model/converters.py)."""

from __future__ import annotations

from slmops.model.converters import CONVERTER, llama_cpp_dir

__all__ = ["CONVERTER", "llama_cpp_dir"]
