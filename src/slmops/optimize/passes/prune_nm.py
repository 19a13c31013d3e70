"""prune-nm: N:M semi-structured sparsity by magnitude (2:4 by default).

In every group of M consecutive weights along the input dimension of each decoder projection,
keep the N largest |w| and zero the rest. 2:4 is the pattern sparse tensor cores (NVIDIA
Ampere and later) and some CPU kernels accelerate, so unlike unstructured sparsity it can turn
into real speed. The pattern is verified on the final tensors, group by group, before saving:
a variant labelled 2:4 that is not 2:4 would silently fail on the hardware that relies on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

from pydantic import Field, model_validator

from slmops.model.arch import ArchInfo
from slmops.model.handle import ModelFormat, ModelHandle
from slmops.model.hf import decoder_linears, load_causal_lm, save_causal_lm
from slmops.optimize.passes import _needs
from slmops.optimize.passes._prune_common import (
    check_nm_divisible,
    prune_nm_by_score_,
    sparsity_result,
    verify_nm,
)
from slmops.optimize.passes.base import Pass, PassConfig, PassResult


class PruneNMConfig(PassConfig):
    n: int = Field(2, ge=1, description="weights kept in every group of m (0 < n < m)")
    m: int = Field(4, ge=2, le=256, description="group size along the input dimension")

    @model_validator(mode="after")
    def _n_below_m(self) -> Self:
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m (got n={self.n}, m={self.m})")
        return self


class PruneNM(Pass[PruneNMConfig]):
    name: ClassVar[str] = "prune-nm"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "N:M semi-structured sparsity (2:4 by default) by magnitude, verified"
    kind: ClassVar[str] = "prune-semi-structured"
    input_format: ClassVar[ModelFormat] = ModelFormat.HF
    output_format: ClassVar[ModelFormat] = ModelFormat.HF
    Config = PruneNMConfig
    tools: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    def prepare(self) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        return _needs.decoder_blocks(arch)

    def check_model(self, arch: ArchInfo) -> list[str]:
        return [*self.check(arch), *_needs.nm_widths(arch, self.config.m)]

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        import torch

        n, m = self.config.n, self.config.m
        lm = load_causal_lm(model.path)
        check_nm_divisible(lm, m)
        with torch.no_grad():
            for _, mod in decoder_linears(lm):
                prune_nm_by_score_(mod.weight, mod.weight.abs(), n, m)
        verified = verify_nm(lm, n, m)
        sparsity, report = sparsity_result(lm, target=1 - n / m, method="magnitude", **verified)
        save_causal_lm(lm, model.path, out_dir)
        return PassResult(report=report, sparsity=sparsity)
