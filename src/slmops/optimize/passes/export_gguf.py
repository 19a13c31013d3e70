"""export-gguf: Hugging Face -> GGUF (f32/f16/bf16/q8_0) with llama.cpp's own converter.

The converter refuses BPE tokenizers whose pre-tokenizer hash it does not know, which is every
locally trained tokenizer. We run it in-process with a fallback: when the hash is unknown, the
configured pre-tokenizer type is used ("gpt-2" matches the byte-level BPE regex of GPT-2-style
tokenizers; note "gpt2" converts but fails at load time). Known tokenizers keep their own type.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slmops.core.errors import ModelFormatError, ToolError
from slmops.model.arch import ArchInfo
from slmops.model.handle import ModelFormat, ModelHandle
from slmops.optimize.passes import _needs
from slmops.optimize.passes._llama_cpp_tools import CONVERTER, llama_cpp_dir
from slmops.optimize.passes.base import Pass, PassConfig, PassResult

GGUF_NAME = "model.gguf"


class ExportGgufConfig(PassConfig):
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16",
        description="tensor type written by the converter (quantize further with quantize-gguf)",
    )
    pre_tokenizer: str = Field(
        "gpt-2",
        description="pre-tokenizer type used when llama.cpp does not recognise the tokenizer "
        "(locally trained byte-level BPE); ignored for tokenizers it knows",
    )
    force_pre_tokenizer: bool = Field(
        False, description="use pre_tokenizer even when the tokenizer is known"
    )


class ExportGguf(Pass[ExportGgufConfig]):
    name = "export-gguf"
    summary = "Convert a Hugging Face model to GGUF with llama.cpp's convert_hf_to_gguf.py"
    kind = "export"
    input_format = ModelFormat.HF
    output_format = ModelFormat.GGUF
    Config = ExportGgufConfig
    tools = ("llama-cpp-python", "gguf", "torch", "transformers")

    def prepare(self) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        return [
            *_needs.causal_lm(arch),
            *_needs.converter_knows(arch, arch.llama_cpp_converter, "llama.cpp converter"),
            *_needs.tokenizer_fits(arch),
            *_needs.llama_cpp_vocab(arch),
            *_needs.llama_cpp_attention_width(arch),
        ]

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        self.refuse_if_unfit(model)
        cfg = self.config
        tool_dir = llama_cpp_dir()
        outfile = out_dir / GGUF_NAME
        pre_used = _convert(
            tool_dir, model.path, outfile, cfg.outtype, cfg.pre_tokenizer, cfg.force_pre_tokenizer
        )
        if not outfile.exists() or outfile.stat().st_size == 0:
            raise ToolError("the converter finished without writing a GGUF file", where=model.path)
        return PassResult(
            report={
                "outtype": cfg.outtype,
                "pre_tokenizer": pre_used,
                "converter": str(tool_dir / CONVERTER),
            },
            quantization=cfg.outtype.upper(),
        )


def _import_converter(tool_dir: Path) -> tuple[Any, Any]:
    """Import the converter against its own vendored `gguf` package.

    The converter needs the gguf-py of its llama.cpp version. If the PyPI `gguf` (an older
    writer) was imported earlier in this process, `import gguf` would return that one and the
    converter fails on missing attributes; so the PyPI modules step aside while the converter
    imports, and come back afterwards for the code that uses them.
    """
    import importlib

    if "convert_hf_to_gguf" in sys.modules:
        return sys.modules["convert_hf_to_gguf"], importlib.import_module("conversion.base")
    saved = {k: m for k, m in sys.modules.items() if k == "gguf" or k.startswith("gguf.")}
    for k in saved:
        del sys.modules[k]
    paths = [str(tool_dir), str(tool_dir / "gguf-py")]
    sys.path[:0] = paths
    try:
        converter = importlib.import_module("convert_hf_to_gguf")
        base = importlib.import_module("conversion.base")
    finally:
        for p in paths:
            sys.path.remove(p)
        for k in [k for k in sys.modules if k == "gguf" or k.startswith("gguf.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return converter, base


def _convert(tool_dir: Path, src: Path, outfile: Path, outtype: str, pre: str, force: bool) -> str:
    converter, base = _import_converter(tool_dir)
    text_model: Any = base.TextModel
    original = text_model.get_vocab_base_pre
    used: dict[str, str] = {}

    def patched(self: Any, tokenizer: Any) -> str:
        if force:
            used["pre"] = pre
            return pre
        try:
            res = str(original(self, tokenizer))
            used["pre"] = res
            return res
        except NotImplementedError:
            used["pre"] = pre + " (fallback: tokenizer not recognised by llama.cpp)"
            return pre

    text_model.get_vocab_base_pre = patched
    argv = sys.argv
    sys.argv = [CONVERTER, str(src), "--outfile", str(outfile), "--outtype", outtype]
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            converter.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            tail = "\n".join(log.getvalue().splitlines()[-10:])
            if "not supported" in tail:
                raise ModelFormatError(
                    f"llama.cpp cannot convert this architecture: {tail}", where=src
                ) from None
            raise ToolError(
                f"convert_hf_to_gguf exited with {exc.code}: {tail}", where=src
            ) from None
    finally:
        sys.argv = argv
        text_model.get_vocab_base_pre = original
        logging.getLogger().removeHandler(handler)
    return used.get("pre", "n/a")
