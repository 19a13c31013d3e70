"""Shared pieces of the unstructured and n:m pruning passes: thresholds, masks, reports.

Everything here works tensor by tensor (and in chunks inside a tensor) so that pruning a 4 B
model never needs a second copy of its weights: a global magnitude threshold is found with
histogram refinement instead of concatenating and sorting every weight.
Heavy imports stay inside functions because the pass modules import this one at listing time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from slmops.core.errors import ConfigError, ToolError
from slmops.model.hf import decoder_linears, tensor_sparsity_report

if TYPE_CHECKING:
    import torch

# Elements per chunk when scanning a tensor; bounds the temporaries to a few tens of MB.
CHUNK = 1 << 22
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None, 'N:M' -> (N, M) with 0 < N < M; anything else is a ValueError."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m


def _abs_chunks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """|w| of a tensor in float32, one bounded chunk at a time."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start : start + CHUNK].abs().float()


def kth_smallest_abs(
    tensors: Sequence[torch.Tensor], k: int, *, bins: int = 4096, gather_limit: int = 1 << 22
) -> float:
    """The k-th smallest |w| (1-based) over several tensors, without concatenating them.

    Histogram refinement: keep an interval [lo, hi) known to hold the answer and the count of
    elements below it, split the interval into `bins` buckets (one streaming pass), descend into
    the bucket holding rank k, and once the interval holds few enough elements gather them and
    take the exact k-th value. Memory stays at one chunk plus `gather_limit` floats.
    """
    import torch

    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"rank {k} outside 1..{total}")
    top = max(float(a.max()) for t in tensors for a in _abs_chunks(t))
    lo = 0.0
    hi = float(torch.nextafter(torch.tensor(top), torch.tensor(float("inf"))))
    below, inside = 0, total
    while inside > gather_limit:
        edges = torch.linspace(lo, hi, bins + 1)
        counts = torch.zeros(bins + 2, dtype=torch.long)
        for t in tensors:
            for a in _abs_chunks(t):
                counts += torch.bincount(torch.bucketize(a, edges, right=True), minlength=bins + 2)
        cum = below + torch.cumsum(counts[1 : bins + 1], 0)
        j = int(torch.searchsorted(cum, torch.tensor(k)))  # first bucket whose cumulative >= k
        if j >= bins:  # rank k lies in values equal to `hi` rounding: stop refining
            return float(edges[-1])
        new_lo, new_hi = float(edges[j]), float(edges[j + 1])
        new_below = below if j == 0 else int(cum[j - 1])
        new_inside = int(counts[j + 1])
        if new_inside == inside or new_hi <= new_lo:  # massive ties: cannot split further
            return new_lo
        lo, hi, below, inside = new_lo, new_hi, new_below, new_inside
    parts = []
    for t in tensors:
        for a in _abs_chunks(t):
            parts.append(a[(a >= lo) & (a < hi)])
    values = torch.cat(parts)
    return float(torch.kthvalue(values, k - below).values)


def zero_at_or_below_(weight: torch.Tensor, threshold: float) -> None:
    """Zero every weight whose magnitude is <= threshold, in place."""
    weight.masked_fill_(weight.abs() <= threshold, 0.0)


def prune_rows_by_score_(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    """Zero the lowest-score `sparsity` fraction in every output row (Wanda's comparison group)."""
    import torch

    k = int(weight.shape[1] * sparsity)
    if k == 0:
        return
    idx = torch.topk(score, k, dim=1, largest=False).indices
    weight.scatter_(1, idx, 0.0)


def prune_nm_by_score_(weight: torch.Tensor, score: torch.Tensor, n: int, m: int) -> None:
    """Keep the n highest-score weights of every m consecutive inputs of each row, in place."""
    import torch

    rows, cols = weight.shape
    grouped = score.reshape(rows, cols // m, m)
    drop = torch.topk(grouped, m - n, dim=2, largest=False).indices
    weight.view(rows, cols // m, m).scatter_(2, drop, 0.0)


def check_nm_divisible(model: Any, m: int) -> None:
    """Refuse early (before touching weights) when a projection's inputs do not split into m."""
    bad = [
        f"{name} ({mod.in_features})" for name, mod in decoder_linears(model) if mod.in_features % m
    ]
    if bad:
        raise ConfigError(
            f"input width not divisible by m={m}: " + ", ".join(bad[:4]),
            hint="choose an m that divides every projection's input width (4 or 8 usually do)",
        )


def verify_nm(model: Any, n: int, m: int) -> dict[str, Any]:
    """Count nonzeros per group of m inputs in every projection; ToolError if any exceeds n."""
    groups = 0
    for name, mod in decoder_linears(model):
        w = mod.weight.detach()
        per_group = (w.reshape(w.shape[0], -1, m) != 0).sum(dim=2)
        worst = int(per_group.max())
        if worst > n:
            raise ToolError(f"{name}: a group of {m} weights keeps {worst} nonzeros (> {n})")
        groups += per_group.numel()
    return {"pattern": f"{n}:{m}", "verified": True, "groups_checked": groups}


def per_block_sparsity(per_tensor: dict[str, float], model: Any) -> dict[str, float]:
    """Zero fraction per decoder block (all its projections together), keyed by block index."""
    zeros: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name, mod in decoder_linears(model):
        match = _LAYER_INDEX.search(name)
        if match is None or name not in per_tensor:
            continue
        key = match.group(1)
        n = mod.weight.numel()
        zeros[key] = zeros.get(key, 0.0) + per_tensor[name] * n
        sizes[key] = sizes.get(key, 0) + n
    return {k: round(zeros[k] / sizes[k], 6) for k in sorted(zeros, key=int)}


def sparsity_result(model: Any, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PassResult.sparsity, card report): measured zeros per tensor and per decoder block."""
    measured = tensor_sparsity_report(model)
    blocks = per_block_sparsity(measured["per_layer"], model)
    sparsity = {**measured, **extra, "per_block": blocks}
    report = {**extra, "measured": measured["overall"], "per_layer_sparsity": blocks}
    return sparsity, report
