"""prune-wanda: activation-aware pruning (Wanda, Sun et al. 2023, arXiv:2306.11695).

Magnitude pruning ignores that a few input features of an LLM carry activations orders of
magnitude larger than the rest, so a small weight on such a feature matters more than a large
weight on a quiet one. Wanda scores each weight by |W_ij| * ||X_j||_2, where X_j is input
column j of the projection gathered over calibration tokens, and compares scores within each
output row (the paper's best comparison group). No weight update, no gradients.

Layer-wise and sequential, as in the reference implementation: the calibration windows are
run up to the first decoder layer and captured; then for each layer in turn the input norms of
all its projections are gathered with forward pre-hooks, the layer is pruned, and its outputs
*after* pruning are recomputed and fed to the next layer, so later layers are calibrated on
what the pruned model actually produces. Only one layer's activations are held at a time.

With `pattern: "2:4"` (or any N:M) the same scores choose the N kept weights of every group of
M inputs; the variant is then semi-structured (its card says so) and the pattern is verified.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

from pydantic import Field, field_validator, model_validator

from slmops.core.errors import ToolError
from slmops.model.arch import ArchInfo
from slmops.model.handle import ModelFormat, ModelHandle
from slmops.model.hf import PROJECTIONS, decoder_layers, load_causal_lm, save_causal_lm
from slmops.optimize.passes import _needs
from slmops.optimize.passes._prune_calib import (
    CalibrationOptions,
    ColumnNorms,
    capture_first_layer_inputs,
    load_calibration,
    run_layer,
)
from slmops.optimize.passes._prune_common import (
    check_nm_divisible,
    parse_pattern,
    prune_nm_by_score_,
    prune_rows_by_score_,
    sparsity_result,
    verify_nm,
)
from slmops.optimize.passes.base import Pass, PassConfig, PassResult


class _WandaOptions(PassConfig):
    sparsity: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="fraction of weights zeroed in every output row (unstructured pattern only)",
    )
    pattern: str = Field(
        "unstructured",
        description="'unstructured' (per-row target sparsity) or 'N:M' such as '2:4' or '4:8'",
    )

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> Self:
        nm = parse_pattern(self.pattern)
        if (
            nm
            and "sparsity" in self.model_fields_set
            and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9
        ):
            raise ValueError(
                f"pattern {self.pattern} fixes the sparsity at {1 - nm[0] / nm[1]:g}; "
                "drop the sparsity option or use pattern 'unstructured'"
            )
        return self


class PruneWandaConfig(CalibrationOptions, _WandaOptions):
    """Wanda options; the calibration options follow them in listings."""


class PruneWanda(Pass[PruneWandaConfig]):
    name: ClassVar[str] = "prune-wanda"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "Wanda: prune by |weight| x input activation norm, layer by layer"
    # Unstructured by default; with an N:M pattern the sparsity report says prune-semi-structured.
    kind: ClassVar[str] = "prune-unstructured"
    input_format: ClassVar[ModelFormat] = ModelFormat.HF
    output_format: ClassVar[ModelFormat] = ModelFormat.HF
    Config = PruneWandaConfig
    tools: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    def prepare(self) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        return _needs.decoder_blocks(arch)

    def check_model(self, arch: ArchInfo) -> list[str]:
        nm = parse_pattern(self.config.pattern)
        return [*self.check(arch), *(_needs.nm_widths(arch, nm[1]) if nm else [])]

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        import torch

        cfg = self.config
        nm = parse_pattern(cfg.pattern)
        ids, calib = load_calibration(model, cfg)  # before loading weights: fail fast on bad text
        lm = load_causal_lm(model.path)
        if nm:
            check_nm_divisible(lm, nm[1])
        hidden, layer_kwargs = capture_first_layer_inputs(lm, ids)
        for index, layer in enumerate(decoder_layers(lm)):
            linears = {
                name: mod
                for name, mod in layer.named_modules()
                if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
            }
            stats = ColumnNorms(linears)
            with stats.watching():
                run_layer(layer, hidden, layer_kwargs[index])
            with torch.no_grad():
                for name, mod in linears.items():
                    try:
                        score = mod.weight.abs() * stats.norms(name).unsqueeze(0)
                    except RuntimeError as exc:
                        raise ToolError(f"layer {index}: {exc}") from None
                    if nm:
                        prune_nm_by_score_(mod.weight, score, *nm)
                    else:
                        prune_rows_by_score_(mod.weight, score, cfg.sparsity)
            hidden = run_layer(
                layer, hidden, layer_kwargs[index]
            )  # pruned outputs feed the next layer
        extra = {"method": "wanda", "pattern": cfg.pattern, "sequential": True}
        if nm:
            extra |= verify_nm(lm, *nm) | {"kind": "prune-semi-structured"}
            target = 1 - nm[0] / nm[1]
        else:
            extra["kind"] = "prune-unstructured"
            target = cfg.sparsity
        sparsity, report = sparsity_result(lm, target=target, **extra)
        save_causal_lm(lm, model.path, out_dir)
        return PassResult(report={**report, **calib}, sparsity=sparsity)
