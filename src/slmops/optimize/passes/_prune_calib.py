"""Calibration plumbing shared by the activation-aware pruning passes (Wanda, structured).

Options, token windows, and three kinds of activation statistics gathered with hooks:
per-input-column squared norms of a Linear (Wanda and channel/head importance), block
influence of whole decoder layers (ShortGPT), and the captured inputs of the first decoder
layer so a pass can run the layers one at a time (sequential, layer-wise pruning).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from slmops.core.digest import sha256_file
from slmops.model.handle import ModelHandle
from slmops.model.hf import calibration_windows, decoder_layers, read_calibration_text
from slmops.optimize.passes.base import PassConfig

if TYPE_CHECKING:
    import torch

BATCH = 4  # calibration windows per forward pass: bounds activation memory on large models


class CalibrationOptions(PassConfig):
    """Options of passes that look at activations on calibration text."""

    content_fields: ClassVar[tuple[str, ...]] = ("calibration",)

    calibration: Path | None = Field(
        None,
        description="UTF-8 text from the target domain "
        "(default: the model folder's calibration.txt)",
    )
    samples: int = Field(16, ge=1, le=4096, description="calibration windows drawn from the text")
    seqlen: int = Field(
        128, ge=8, le=32768, description="tokens per window (clamped to max_position_embeddings)"
    )
    seed: int = Field(0, ge=0, description="seed for drawing the windows (same seed, same windows)")


def load_calibration(
    model: ModelHandle, opts: CalibrationOptions
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token windows [samples, seqlen] and what the card records about them."""
    text, path = read_calibration_text(opts.calibration, model.path)
    max_pos = model.hf_config().get("max_position_embeddings")
    seqlen = min(opts.seqlen, int(max_pos)) if max_pos else opts.seqlen
    ids = calibration_windows(model.path, text, samples=opts.samples, seqlen=seqlen, seed=opts.seed)
    info = {
        "calibration": path.name,
        "calibration_digest": sha256_file(path),
        "samples": opts.samples,
        "seqlen": seqlen,
        "seed": opts.seed,
    }
    return ids, info


def forward_batches(model: Any, ids: torch.Tensor) -> None:
    """Run the model over the windows in small batches, for the side effects of hooks."""
    import torch

    body = getattr(model, "model", model)  # the decoder stack: no lm_head logits needed
    with torch.no_grad():
        for start in range(0, ids.shape[0], BATCH):
            body(input_ids=ids[start : start + BATCH], use_cache=False)


class ColumnNorms:
    """Sum over calibration tokens of x_j^2 for each input column j of the watched Linears."""

    def __init__(self, modules: dict[str, torch.nn.Linear]) -> None:
        self.modules = modules
        self.sumsq: dict[str, torch.Tensor] = {}

    @contextmanager
    def watching(self) -> Iterator[ColumnNorms]:
        handles = [
            mod.register_forward_pre_hook(self._hook(name)) for name, mod in self.modules.items()
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            prev = self.sumsq.get(name)
            self.sumsq[name] = sq if prev is None else prev + sq

        return hook

    def norms(self, name: str) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens, one value per input column."""
        if name not in self.sumsq:
            raise RuntimeError(f"no activations reached {name}")
        return self.sumsq[name].sqrt()


def block_influence(model: Any, ids: torch.Tensor) -> list[float]:
    """ShortGPT block influence per decoder layer: 1 - mean cosine(h_in, h_out) over tokens."""
    import torch

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def make_hook(i: int) -> Any:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[i] += float(cos.sum())
            counts[i] += cos.numel()

        return hook

    handles = [
        layer.register_forward_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        forward_batches(model, ids)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first decoder layer."""


def capture_first_layer_inputs(
    model: Any, ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering decoder layer 0, one [1, seqlen, hidden] tensor per window, plus
    for every layer the keyword arguments the model passes to it (mask, rotary embeddings,
    positions).

    The keyword arguments are recorded per layer because they differ between layers in models
    with sliding-window layers (Gemma 2/3: a windowed mask and local rotary embeddings on the
    sliding layers). Every window has the same length and batch size 1, so one set per layer
    serves all windows: the first window runs through the whole stack to record them, the others
    stop at layer 0.
    """
    import torch

    layers = list(decoder_layers(model))
    inputs: list[torch.Tensor] = []
    per_layer: dict[int, dict[str, Any]] = {}

    def make_hook(index: int) -> Any:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kw = dict(kwargs)
            hidden = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                inputs.append(hidden.detach())
            per_layer.setdefault(index, kw)
            if index == 0 and len(per_layer) == len(layers) and len(inputs) > 1:
                raise _Captured

        return hook

    body = getattr(model, "model", model)
    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for row in ids:
                with suppress(_Captured):
                    body(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, [per_layer[i] for i in range(len(layers))]


def run_layer(
    layer: Any, inputs: Sequence[torch.Tensor], kwargs: dict[str, Any]
) -> list[torch.Tensor]:
    """Outputs of one decoder layer for each captured input."""
    import torch

    outs = []
    with torch.no_grad():
        for h in inputs:
            out = layer(h, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs
