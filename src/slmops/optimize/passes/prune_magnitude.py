"""prune-magnitude: zero the smallest-magnitude weights of the decoder projections.

The baseline every other pruning method is measured against: no data, no calibration, one
threshold. Only the q/k/v/o and gate/up/down projections inside decoder blocks are pruned;
embeddings, norms and lm_head are left dense because zeroing them hurts quality the most for
the least saving.

Scopes:
- per-layer: every projection matrix is pruned to exactly the target sparsity (uniform).
- global: one |w| threshold across all projections, so matrices with many small weights lose
  more than others. The threshold is found by histogram refinement (see kth_smallest_abs),
  never by concatenating the weights, so memory stays flat on a 4 B model.

Zeros are stored as dense tensors: the file does not shrink, but the sparsity is real and
visible to sparse kernels and to quantizers that exploit it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from slmops.model.arch import ArchInfo
from slmops.model.handle import ModelFormat, ModelHandle
from slmops.model.hf import decoder_linears, load_causal_lm, save_causal_lm
from slmops.optimize.passes import _needs
from slmops.optimize.passes._prune_common import (
    kth_smallest_abs,
    sparsity_result,
    zero_at_or_below_,
)
from slmops.optimize.passes.base import Pass, PassConfig, PassResult


class PruneMagnitudeConfig(PassConfig):
    sparsity: float = Field(
        0.5, ge=0.0, lt=1.0, description="fraction of projection weights set to zero, in [0, 1)"
    )
    scope: Literal["global", "per-layer"] = Field(
        "per-layer",
        description="per-layer: every projection gets the target sparsity; "
        "global: one magnitude threshold across all projections",
    )


class PruneMagnitude(Pass[PruneMagnitudeConfig]):
    name: ClassVar[str] = "prune-magnitude"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "Zero the smallest-|w| weights of decoder projections (no data needed)"
    kind: ClassVar[str] = "prune-unstructured"
    input_format: ClassVar[ModelFormat] = ModelFormat.HF
    output_format: ClassVar[ModelFormat] = ModelFormat.HF
    Config = PruneMagnitudeConfig
    tools: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    def prepare(self) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        return _needs.decoder_blocks(arch)

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        import torch

        cfg = self.config
        lm = load_causal_lm(model.path)
        weights = [mod.weight for _, mod in decoder_linears(lm)]
        with torch.no_grad():
            if cfg.sparsity > 0 and cfg.scope == "global":
                k = int(sum(w.numel() for w in weights) * cfg.sparsity)
                if k > 0:
                    threshold = kth_smallest_abs(weights, k)
                    for w in weights:
                        zero_at_or_below_(w, threshold)
            elif cfg.sparsity > 0:
                for w in weights:
                    k = int(w.numel() * cfg.sparsity)
                    if k > 0:
                        zero_at_or_below_(w, kth_smallest_abs([w], k))
        sparsity, report = sparsity_result(
            lm, target=cfg.sparsity, method="magnitude", threshold_scope=cfg.scope
        )
        save_causal_lm(lm, model.path, out_dir)
        return PassResult(report=report, sparsity=sparsity)
