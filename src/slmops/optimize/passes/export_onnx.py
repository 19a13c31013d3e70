"""export-onnx: Hugging Face -> ONNX Runtime GenAI folder with the runtime's own model builder.

The builder writes model.onnx (+ external data), genai_config.json and the tokenizer files that
onnxruntime_genai loads directly. int4/int8 use MatMulNBits weight-only quantization with the
block size and accuracy level given here (accuracy level 4 = int8 activations, the fast CPU path).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from slmops.core.errors import ModelFormatError, ToolError
from slmops.core.process import die_with_parent
from slmops.model.arch import ArchInfo
from slmops.model.handle import ModelFormat, ModelHandle
from slmops.optimize.passes import _needs
from slmops.optimize.passes.base import Pass, PassConfig, PassResult


class ExportOnnxConfig(PassConfig):
    precision: Literal["fp32", "fp16", "int8", "int4"] = Field(
        "int4", description="weight precision"
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="int4/int8 quantization block size"
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4,
        description="MatMulNBits compute precision: 1 fp32, 2 fp16, 3 bf16, 4 int8 (0 = builder default)",
    )
    symmetric: bool = Field(True, description="symmetric (int) or asymmetric (uint) quantization")
    algorithm: Literal["default", "rtn", "k_quant"] = Field(
        "default", description="int4/int8 weight algorithm"
    )
    int8_last_matmul: bool = Field(
        False, description="keep lm_head at int8 when quantizing to int4"
    )
    execution_provider: Literal["cpu"] = Field("cpu", description="target execution provider")


class ExportOnnx(Pass[ExportOnnxConfig]):
    name = "export-onnx"
    summary = (
        "Build an ONNX Runtime GenAI model (fp32/fp16/int8/int4) with onnxruntime_genai's builder"
    )
    kind = "export"
    input_format = ModelFormat.HF
    output_format = ModelFormat.ONNX
    Config = ExportOnnxConfig
    tools = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "torch", "transformers")
    # 2: weights streamed to disk (_onnx_builder.py). The output is byte-identical to 1's, but
    # a cached step's card carries the memory figures of the code that ran it: benches must
    # not print version 1's peak as this one's
    version: ClassVar[int] = 2

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        return [
            *_needs.causal_lm(arch),
            *_needs.converter_knows(arch, arch.onnx_genai_builder, "onnxruntime-genai builder"),
        ]

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        self.refuse_if_unfit(model)
        cfg = self.config
        extra = []
        if cfg.precision in ("int4", "int8"):
            extra += [f"block_size={cfg.block_size}", f"is_symmetric={str(cfg.symmetric).lower()}"]
            if cfg.accuracy_level:
                extra.append(f"accuracy_level={cfg.accuracy_level}")
            if cfg.algorithm != "default":
                extra.append(f"algo_config={cfg.algorithm}")
            if cfg.int8_last_matmul and cfg.precision == "int4":
                extra.append("matmul_mixed_precision=last_matmul:int8")
        with tempfile.TemporaryDirectory(prefix="slmops-onnx-cache-") as cache:
            cmd = [
                sys.executable,
                "-m",
                "slmops.optimize.passes._onnx_builder",  # the builder, with config fixes
                "-i",
                str(model.path),
                "-o",
                str(out_dir),
                "-p",
                cfg.precision,
                "-e",
                cfg.execution_provider,
                "-c",
                cache,
            ]
            if extra:
                cmd += ["--extra_options", *extra]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, preexec_fn=die_with_parent
            )
        # The builder runs in its own process (it prints freely and sets global state); its output
        # is forwarded to the step log.
        sys.stderr.write(proc.stdout[-20000:] + proc.stderr[-20000:])
        if proc.returncode != 0 or not (out_dir / "genai_config.json").exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            if "not supported" in tail.lower():
                raise ModelFormatError(
                    f"the ONNX GenAI builder does not support this model: {tail}", where=model.path
                )
            raise ToolError(
                f"onnxruntime_genai builder failed (exit {proc.returncode}): {tail}",
                where=model.path,
            )
        return PassResult(
            report={
                "precision": cfg.precision,
                "block_size": cfg.block_size,
                "accuracy_level": cfg.accuracy_level,
                "symmetric": cfg.symmetric,
                "algorithm": cfg.algorithm,
            },
            quantization=cfg.precision.upper(),
        )
