"""quantize-gguf: GGUF -> a smaller GGUF through llama.cpp's own quantizer (llama_model_quantize).

Tensor rows not divisible by a k-quant's block (256) fall back to a compatible type inside
llama.cpp; the card records the file's real size so reports never rely on nominal bits/weight.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator

from slmops.core.errors import ConfigError, ToolError
from slmops.model.handle import ModelFormat, ModelHandle
from slmops.optimize.passes.base import Pass, PassConfig, PassResult
from slmops.optimize.passes.export_gguf import GGUF_NAME

# Nominal bits per weight (llama.cpp quantize README) for estimates before the file exists.
BITS = {
    "F16": 16,
    "BF16": 16,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.7,
    "Q5_K_S": 5.5,
    "Q5_0": 5.5,
    "Q5_1": 6,
    "Q4_K_M": 4.89,
    "Q4_K_S": 4.6,
    "Q4_0": 4.5,
    "Q4_1": 5,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.46,
    "Q3_K_L": 4.3,
    "Q3_K_M": 3.9,
    "Q3_K_S": 3.5,
    "Q2_K": 3.16,
    "Q2_K_S": 2.9,
    "TQ1_0": 1.7,
    "TQ2_0": 2.1,
}
# i-quants below 4 bits need an importance matrix, which this pass does not compute yet.
NEEDS_IMATRIX = {
    "IQ1_S",
    "IQ1_M",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ2_M",
    "IQ3_XXS",
    "IQ3_XS",
    "Q2_K_S",
}


def supported_types() -> list[str]:
    """Types the installed llama.cpp exposes, minus the ones needing an importance matrix."""
    import llama_cpp

    names = [
        n.removeprefix("LLAMA_FTYPE_MOSTLY_")
        for n in dir(llama_cpp)
        if n.startswith("LLAMA_FTYPE_MOSTLY_")
    ]
    return sorted(n for n in names if n not in NEEDS_IMATRIX and "MOE" not in n and "FP4" not in n)


class QuantizeGgufConfig(PassConfig):
    type: str = Field(
        "Q4_K_M", description="llama.cpp quantization type, e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0"
    )
    threads: int = Field(0, ge=0, description="quantizer threads (0 = all cores)")
    allow_requantize: bool = Field(False, description="allow quantizing an already quantized GGUF")
    pure: bool = Field(False, description="quantize every tensor to `type` (no k-quant mixtures)")

    @field_validator("type")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()


class QuantizeGguf(Pass[QuantizeGgufConfig]):
    name = "quantize-gguf"
    version = 2  # 2: the card lists the tensor types llama.cpp wrote
    summary = "Quantize a GGUF model with llama.cpp's quantizer (Q8_0 ... Q4_0, k-quants)"
    kind = "quantize"
    input_format = ModelFormat.GGUF
    output_format = ModelFormat.GGUF
    Config = QuantizeGgufConfig
    tools = ("llama-cpp-python",)

    def prepare(self) -> None:
        cfg = self.config
        types = supported_types()
        if cfg.type not in types:
            raise ConfigError(
                f"unsupported quantization type {cfg.type!r}",
                where="quantize-gguf.type",
                hint="supported without an importance matrix: " + ", ".join(types),
            )

    def estimate_output_bytes(self, model: ModelHandle) -> int:
        return model.size_bytes

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        import ctypes

        import llama_cpp

        cfg = self.config
        self.prepare()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{cfg.type}")
        params.nthread = cfg.threads or (os.cpu_count() or 1)
        params.allow_requantize = cfg.allow_requantize
        params.pure = cfg.pure
        src = model.gguf_file
        dst = out_dir / GGUF_NAME
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
        if rc != 0 or not dst.exists():
            raise ToolError(
                f"llama_model_quantize returned {rc} for type {cfg.type}",
                where=src,
                hint="an already quantized input needs allow_requantize: true; see the step log",
            )
        from slmops.model.gguf_info import read_gguf_info

        # What llama.cpp really wrote, tensor by tensor: k-quants fall back to legacy types for
        # rows whose width is not a multiple of 256 (Gemma 3 270M's 640), and the embedding
        # may stay wider, so the requested type alone does not explain a file's size.
        info = read_gguf_info(dst, check_architecture=False)
        return PassResult(
            report={
                "type": cfg.type,
                "input_bytes": src.stat().st_size,
                "output_bytes": dst.stat().st_size,
                "tensor_types": info.tensor_types,
                "tensor_type_bytes": info.tensor_type_bytes,
                "tensors": info.tensors,
            },
            quantization=cfg.type,
        )
