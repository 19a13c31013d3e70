"""prune-structured: make the model physically smaller by removing FFN channels, KV groups or
whole decoder layers.

Unstructured zeros only pay off with sparse kernels; removing structure shrinks every runtime's
memory, file size and compute at once, at a larger quality cost (plan a distillation or LoRA
healing step for ratios above ~0.2). Three targets:

- ffn: drop intermediate channels (rows of gate/up, columns of down). Every layer keeps the same
  count so config.intermediate_size stays one integer, rounded to a multiple of `round_to`
  because GGUF k-quants and matmul kernels want aligned widths.
- heads: drop whole KV groups (one KV head with the query heads that share it) so grouped-query
  attention stays valid; head_dim is kept and written to the config.
- layers: drop whole decoder layers ranked by ShortGPT block influence (Men et al. 2024,
  arXiv:2403.03853): 1 - cosine(h_in, h_out); a layer that barely changes its input goes first.

Importance is "magnitude" (weight norms, no data) or "activation" (calibration text: channel or
head output contribution ||X_j|| * ||W_down[:, j]||, Wanda-style; block influence for layers).
Decisions are one-shot on the dense model. The result is checked with a forward pass before it
is saved, then written with the new config by save_pretrained.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from slmops.core.errors import ConfigError, ToolError
from slmops.model.arch import ArchInfo
from slmops.model.handle import ModelFormat, ModelHandle
from slmops.model.hf import decoder_layers, load_causal_lm, save_causal_lm
from slmops.optimize.passes import _needs
from slmops.optimize.passes._prune_calib import (
    CalibrationOptions,
    ColumnNorms,
    block_influence,
    forward_batches,
    load_calibration,
)
from slmops.optimize.passes._prune_surgery import (
    attention_weights,
    cut_ffn,
    cut_kv_groups,
    cut_layers,
    dims,
    ffn_magnitude_scores,
    head_magnitude_scores,
)
from slmops.optimize.passes.base import Pass, PassConfig, PassResult


class _StructuredOptions(PassConfig):
    target: Literal["ffn", "heads", "layers"] = Field(
        description="what to remove: FFN channels, attention KV groups, or decoder layers"
    )
    ratio: float = Field(
        0.25, gt=0.0, lt=1.0, description="fraction of the target removed, in (0, 1)"
    )
    round_to: int = Field(
        32, ge=1, description="ffn: kept width is a multiple of this (at least one multiple)"
    )
    importance: Literal["magnitude", "activation"] | None = Field(
        None,
        description="how to rank: weight magnitude or activations on calibration text; "
        "default: magnitude for ffn/heads, activation (block influence) for layers",
    )

    @model_validator(mode="after")
    def _layers_need_activations(self) -> Self:
        if self.target == "layers" and self.importance == "magnitude":
            raise ValueError(
                "layer removal ranks layers by block influence: use importance: activation"
            )
        return self


class PruneStructuredConfig(CalibrationOptions, _StructuredOptions):
    """Structured pruning options; the calibration options follow them in listings."""


class PruneStructured(Pass[PruneStructuredConfig]):
    name: ClassVar[str] = "prune-structured"
    version: ClassVar[int] = 1
    summary: ClassVar[str] = "Remove FFN channels, KV head groups or whole layers (smaller model)"
    kind: ClassVar[str] = "prune-structured"
    input_format: ClassVar[ModelFormat] = ModelFormat.HF
    output_format: ClassVar[ModelFormat] = ModelFormat.HF
    Config = PruneStructuredConfig
    tools: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    def prepare(self) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def estimate_output_bytes(self, model: ModelHandle) -> int:
        return model.size_bytes  # the output is never larger than the input

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        """Every target's needs, each prefixed with its target (one may apply, another not)."""
        return [
            f"target {t}: {m}" for t in ("ffn", "heads", "layers") for m in _target_needs(arch, t)
        ]

    def check_model(self, arch: ArchInfo) -> list[str]:
        missing = _target_needs(arch, self.config.target)
        if not missing:
            try:
                _plan(self.config, _arch_dims(arch))
            except ConfigError as exc:
                missing.append(exc.message)
        return [f"target {self.config.target}: {m}" for m in missing]

    def predict(self, arch: ArchInfo) -> ArchInfo:
        try:
            keep = _plan(self.config, _arch_dims(arch))
        except ConfigError:
            return arch
        if self.config.target == "ffn":
            return replace(arch, intermediate_size=keep)
        if self.config.target == "heads":
            per_group = arch.num_attention_heads // max(arch.num_key_value_heads, 1)
            return replace(arch, num_key_value_heads=keep, num_attention_heads=keep * per_group)
        types = arch.layer_types[:keep] if arch.layer_types else None
        return replace(arch, num_layers=keep, layer_types=types)

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        import torch

        cfg = self.config
        importance = cfg.importance or ("activation" if cfg.target == "layers" else "magnitude")
        before = dims(_Config(model.hf_config()))
        plan_count = _plan(cfg, before)  # refuse impossible ratios before loading anything
        ids, calib = load_calibration(model, cfg) if importance == "activation" else (None, {})
        lm = load_causal_lm(model.path)
        params_before = _count(lm)
        with torch.no_grad():
            if cfg.target == "ffn":
                scores = _ffn_activation(lm, ids) if ids is not None else ffn_magnitude_scores(lm)
                keep = [_top(s, plan_count) for s in scores]
                cut_ffn(lm, keep)
                removed: list[Any] = [
                    {"layer": i, "channels": before["intermediate_size"] - plan_count}
                    for i in range(len(keep))
                ]
            elif cfg.target == "heads":
                scores = (
                    _heads_activation(lm, ids) if ids is not None else head_magnitude_scores(lm)
                )
                groups = [_top(s, plan_count).tolist() for s in scores]
                cut_kv_groups(lm, groups)
                all_groups = range(before["num_key_value_heads"])
                removed = [
                    {"layer": i, "kv_groups": [g for g in all_groups if g not in kept]}
                    for i, kept in enumerate(groups)
                ]
            else:
                if ids is None:  # unreachable: the config refuses layers + magnitude
                    raise ConfigError("layer removal needs calibration activations")
                influence = block_influence(lm, ids)
                kept_layers = _top(torch.tensor(influence), plan_count).tolist()
                removed = [i for i in range(before["num_hidden_layers"]) if i not in kept_layers]
                cut_layers(lm, kept_layers)
                calib["block_influence"] = [round(x, 6) for x in influence]
        _smoke_test(lm)
        save_causal_lm(lm, model.path, out_dir)
        structure = {
            "target": cfg.target,
            "importance": importance,
            "ratio": cfg.ratio,
            "removed": removed,
            "before": before,
            "after": dims(lm.config),
            "parameters_before": params_before,
            "parameters_after": _count(lm),
        }
        return PassResult(report={**structure, **calib}, structure=structure)


def _target_needs(arch: ArchInfo, target: str) -> list[str]:
    missing = _needs.decoder_blocks(arch)
    if target == "heads":
        missing += _needs.kv_groups(arch)
    elif target == "layers" and arch.num_layers < 2:
        missing.append(f"at least 2 decoder layers (has {arch.num_layers})")
    return missing


def _arch_dims(arch: ArchInfo) -> dict[str, int]:
    return {
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size or 0,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
    }


class _Config:
    """Attribute view of a config.json dict, so dims() reads it like a transformers config."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)


def _plan(cfg: PruneStructuredConfig, d: dict[str, int]) -> int:
    """How many channels / KV groups / layers each layer (or the model) keeps."""
    if cfg.target == "ffn":
        width = d["intermediate_size"]
        keep = max(cfg.round_to, round(width * (1 - cfg.ratio) / cfg.round_to) * cfg.round_to)
        what, total = f"FFN channels (rounded to multiples of {cfg.round_to})", width
    elif cfg.target == "heads":
        total = d["num_key_value_heads"]
        keep, what = total - round(total * cfg.ratio), "KV head groups"
    else:
        total = d["num_hidden_layers"]
        keep, what = total - round(total * cfg.ratio), "decoder layers"
    if not 0 < keep < total:
        raise ConfigError(
            f"ratio {cfg.ratio} would keep {keep} of {total} {what}",
            hint="choose a ratio that removes at least one and keeps at least one",
        )
    return keep


def _top(scores: Any, k: int) -> Any:
    """Indices of the k highest scores, in ascending index order (keeps the layout stable)."""
    import torch

    return torch.topk(scores, k).indices.sort().values


def _ffn_activation(lm: Any, ids: Any) -> list[Any]:
    downs = {str(i): layer.mlp.down_proj for i, layer in enumerate(decoder_layers(lm))}
    stats = ColumnNorms(downs)
    with stats.watching():
        forward_batches(lm, ids)
    return [stats.norms(k) * downs[k].weight.detach().norm(dim=0) for k in downs]


def _heads_activation(lm: Any, ids: Any) -> list[Any]:
    import torch

    d = dims(lm.config)
    hd, nq, nkv = d["head_dim"], d["num_attention_heads"], d["num_key_value_heads"]
    layers = list(decoder_layers(lm))
    outs = {str(i): layer.self_attn.o_proj for i, layer in enumerate(layers)}
    stats = ColumnNorms(outs)
    with stats.watching():
        forward_batches(lm, ids)
    scores = []
    for key, layer in zip(outs, layers, strict=True):
        o = attention_weights(layer.self_attn, nq, nkv, hd)[3]
        per_col = stats.norms(key) * o.norm(dim=0)
        scores.append(per_col.reshape(nkv, -1).sum(1))
    return [torch.as_tensor(s) for s in scores]


def _count(lm: Any) -> int:
    return sum(p.numel() for p in lm.parameters())


def _smoke_test(lm: Any) -> None:
    """One short forward pass: a shape mistake in the surgery fails here, not on a device."""
    import torch

    try:
        with torch.no_grad():
            logits = lm(input_ids=torch.zeros((1, 8), dtype=torch.long), use_cache=False).logits
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ToolError(f"pruned model fails a forward pass: {exc}") from None
    if not bool(torch.isfinite(logits).all()):
        raise ToolError("pruned model produces non-finite logits")
