"""Shared plumbing for passes that work on Hugging Face weights with torch.

Loads in float32 by default (pruning decisions need full precision), saves with safetensors,
and carries the tokenizer and generation files across so the output is a complete HF folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.core.errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    import torch

# Files copied from the input folder untouched (everything else is rewritten by save_pretrained).
CARRY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "calibration.txt",
    "heldout.txt",
)
PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
)


def quiet_transformers() -> None:
    """transformers draws tqdm bars for loading and saving; ours are the ones users read."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_causal_lm(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, low_cpu_mem_usage=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"cannot load weights: {exc}", where=path) from None
    model.eval()  # type: ignore[no-untyped-call]
    return model


def save_causal_lm(model: Any, src: Path, out: Path, *, dtype: str | None = None) -> None:
    """Save weights (in the source dtype unless told) and carry tokenizer files over."""
    import torch

    target = dtype or _source_dtype(src)
    if target in ("float16", "bfloat16"):
        model = model.to(getattr(torch, target))
    model.config.dtype = target
    model.save_pretrained(out, safe_serialization=True)
    for name in CARRY_FILES:
        if (src / name).exists() and not (out / name).exists():
            shutil.copy2(src / name, out / name)


def _source_dtype(src: Path) -> str:
    import json

    cfg = json.loads((src / "config.json").read_text())
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def decoder_linears(model: Any) -> Iterator[tuple[str, torch.nn.Linear]]:
    """Linear projections inside decoder blocks (never embeddings or lm_head)."""
    import torch

    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and name.rsplit(".", 1)[-1] in PROJECTIONS
            and ".layers." in f".{name}"
        ):
            yield name, module


def decoder_layers(model: Any) -> Any:
    """The decoder blocks: `model.model.layers` for every *ForCausalLM we handle, else the first
    ModuleList named `layers` (a wrapped text model, e.g. language_model.layers)."""
    import torch

    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, torch.nn.ModuleList):
            return module
    raise ModelFormatError("no decoder layers (a ModuleList named `layers`) in this model")


def read_calibration_text(path: Path | None, model_dir: Path) -> tuple[str, Path]:
    """Calibration text: the given file, else the model folder's calibration.txt."""
    candidate = path if path is not None else model_dir / "calibration.txt"
    if not candidate.exists():
        raise ConfigError(
            "calibration text not found",
            where=candidate,
            hint="set the pass option `calibration` to a UTF-8 text file from your domain",
        )
    try:
        text = candidate.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration text: {exc}", where=candidate) from None
    if len(text.strip()) < 100:
        raise ConfigError("calibration text is too short (under 100 characters)", where=candidate)
    return text, candidate


def calibration_windows(
    model_dir: Path, text: str, *, samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Token windows sampled deterministically from the calibration text: [samples, seqlen]."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 1 << 30
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() <= seqlen:
        reps = seqlen // max(ids.numel(), 1) + 2
        ids = ids.repeat(reps)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def tensor_sparsity_report(model: Any) -> dict[str, Any]:
    """Per-layer fraction of exact zeros in decoder projections, plus the overall figure."""
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name, module in decoder_linears(model):
        w = module.weight.detach()
        z = int((w == 0).sum())
        n = w.numel()
        per_layer[name] = round(z / n, 6)
        zeros += z
        total += n
    return {
        "overall": round(zeros / total, 6) if total else 0.0,
        "per_layer": per_layer,
        "scope": "decoder projections",
    }
