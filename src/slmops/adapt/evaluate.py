"""What an adapter bought and what it cost, measured against its own base in one process.

Gain: perplexity on the site's held-out split, base vs base + adapter. Cost: KL(base || adapted)
per token on general text (the base folder's heldout.txt or calibration.txt, or a file given),
so an adapter that learned its site by forgetting everything else shows it. Both come from the
same PEFT model with the adapter switched off and on, so nothing but the adapter differs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.adapt.train import token_stream

if TYPE_CHECKING:
    import torch

MAX_WINDOWS = 32
BATCH = 4


def _windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    n = min(MAX_WINDOWS, ids.numel() // seqlen)
    if n == 0:  # shorter than one window: score what there is
        return ids.reshape(1, -1)
    return ids[: n * seqlen].reshape(n, seqlen)


def perplexity(model: Any, ids: torch.Tensor, seqlen: int) -> float:
    """Token perplexity over non-overlapping windows (first MAX_WINDOWS)."""
    import torch

    w = _windows(ids, seqlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, w.shape[0], BATCH):
            batch = w[s : s + BATCH]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += batch[:, 1:].numel()
    return math.exp(total / max(count, 1))


def kld_to_base(peft_model: Any, ids: torch.Tensor, seqlen: int) -> float:
    """Mean per-token KL(base || base + adapter) over the windows, full vocabulary."""
    import torch

    w = _windows(ids, seqlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, w.shape[0], BATCH):
            batch = w[s : s + BATCH]
            with peft_model.disable_adapter():
                p = torch.log_softmax(peft_model(input_ids=batch, use_cache=False).logits, -1)
            q = torch.log_softmax(peft_model(input_ids=batch, use_cache=False).logits, -1)
            total += float((p.exp() * (p - q)).sum())
            count += batch.numel()
    return total / max(count, 1)


def general_text(base: Path, given: Path | None) -> tuple[str, str] | None:
    """(text, name) of the general text, or None when there is none to measure forgetting."""
    for cand in [given] if given else [base / "heldout.txt", base / "calibration.txt"]:
        if cand is not None and cand.exists():
            return cand.read_text(encoding="utf-8"), cand.name
    return None


def evaluate_adapter(
    peft_model: Any,
    tokenizer: Any,
    heldout: list[str],
    general: tuple[str, str] | None,
    seqlen: int,
) -> dict[str, Any]:
    held = token_stream(tokenizer, heldout)
    with peft_model.disable_adapter():
        ppl_base = perplexity(peft_model, held, seqlen)
    ppl_adapted = perplexity(peft_model, held, seqlen)
    out: dict[str, Any] = {
        "site_heldout_tokens": int(held.numel()),
        "site_perplexity_base": round(ppl_base, 4),
        "site_perplexity_adapted": round(ppl_adapted, 4),
        "site_perplexity_improvement": round(1 - ppl_adapted / ppl_base, 4),
        "perplexity_protocol": f"token perplexity, non-overlapping windows of {seqlen}, "
        f"first {MAX_WINDOWS}, units joined with EOS",
    }
    if general is None:
        out["general_kld_to_base"] = None
        out["general_text"] = None
    else:
        text, name = general
        ids = token_stream(tokenizer, [text])
        out["general_kld_to_base"] = round(kld_to_base(peft_model, ids, seqlen), 6)
        out["general_text"] = name
        out["general_protocol"] = "mean per-token KL(base || base + adapter), full vocabulary"
    return out
