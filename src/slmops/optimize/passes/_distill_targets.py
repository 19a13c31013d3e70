"""Teacher targets for the distill pass: token windows, the teacher's top-k logits, and the
held-out log-probabilities, computed once and cached on disk.

The teacher is the expensive half of distillation: running it next to the student doubles the
weights in memory and its forward pass costs as much as the student's. Its outputs on a fixed set
of windows never change, so they are computed once, written as one safetensors file keyed by
(teacher digest, text digest, window options), and the teacher is freed before training starts.
Only the top-k log-probabilities per position are kept for training (k=64 holds nearly all the
mass of a trained LM, at k/vocab of the size; the rest of the vocabulary counts as one bucket);
the held-out windows keep the full distribution because the before/after KLD reported in the card
must be exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.core.atomic import write_bytes_atomic
from slmops.core.digest import sha256_json
from slmops.core.errors import ConfigError, UserInputError

if TYPE_CHECKING:
    import torch

CACHE_VERSION = 2  # 2: windows start with BOS
BATCH = 4  # teacher windows per forward pass: bounds activation memory on larger models


DEFAULT_CACHE_MAX_BYTES = 4 << 30
"""Teacher targets kept on disk before the least recently used are removed: held-out targets are
full-vocabulary log-probabilities, ~1 GB per entry for a 262k-vocabulary teacher. Override with
SLMOPS_DISTILL_CACHE_MAX_GB."""


def cache_max_bytes() -> int:
    raw = os.environ.get("SLMOPS_DISTILL_CACHE_MAX_GB")
    if not raw:
        return DEFAULT_CACHE_MAX_BYTES
    try:
        value = float(raw)
    except ValueError:
        raise UserInputError(
            f"SLMOPS_DISTILL_CACHE_MAX_GB={raw!r} is not a number",
            hint="set it to the gigabytes of teacher targets to keep, e.g. 4",
        ) from None
    return max(0, int(value * (1 << 30)))


def prune_cache(folder: Path, *, keep: Path, max_bytes: int) -> list[Path]:
    """Remove the least recently used entries until the folder fits ``max_bytes``; ``keep``
    (the entry just written or read) always stays. Returns what was removed."""
    entries = []
    for f in folder.glob("*.safetensors"):
        try:
            st = f.stat()
        except FileNotFoundError:  # another run removed it
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, f in sorted(entries):
        if total <= max_bytes:
            break
        if f == keep:
            continue
        f.unlink(missing_ok=True)
        total -= size
        removed.append(f)
    return removed


def default_cache_dir() -> Path:
    root = Path(os.environ.get("SLMOPS_CACHE_DIR", Path.home() / ".cache" / "slmops"))
    return root / "distill-teacher"


@dataclass
class Targets:
    train_ids: torch.Tensor  # [N, T] token windows the student trains on
    held_ids: torch.Tensor  # [M, T] held-out windows (from text the training windows never see)
    # [N, T, k] teacher log-probabilities at the loss temperature (None: live teacher, full logits)
    topk_values: torch.Tensor | None
    topk_indices: torch.Tensor | None  # [N, T, k]
    held_logprobs: torch.Tensor  # [M, T, V] teacher log-probabilities at temperature 1


def split_windows(
    tok_dir: Path,
    text: str,
    *,
    windows: int,
    eval_windows: int,
    seqlen: int,
    heldout_fraction: float,
    seed: int,
    where: Path,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows drawn at random from the first part of the text, held-out windows laid
    end to end over the last `heldout_fraction` of it, so the two never share a token.

    Each window starts with the tokenizer's BOS when it has one, as evaluation's windows do
    (evaluate/quality.py) and as the model saw text in training: Gemma 3 without BOS reads
    held-out English at perplexity 196 against 30 with it, so a student distilled on BOS-less
    windows learned from a teacher in a state it is never used in."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.model_max_length = 1 << 30  # tokenizing the whole text at once is intended
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    cut = int(ids.numel() * (1 - heldout_fraction))
    train, held = ids[:cut], ids[cut:]
    if train.numel() <= seqlen or held.numel() < seqlen:
        raise ConfigError(
            f"text too short for seqlen {seqlen}: {ids.numel()} tokens, of which "
            f"{held.numel()} held out",
            where=where,
            hint=f"give more text (at least {int(2 * seqlen / heldout_fraction)} tokens) or "
            "lower seqlen",
        )
    bos = tok.bos_token_id
    body = seqlen - (1 if bos is not None else 0)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - body, (windows,), generator=gen)
    train_w = torch.stack([train[s : s + body] for s in starts.tolist()])
    m = min(eval_windows, held.numel() // body)
    held_w = held[: m * body].reshape(m, body)
    if bos is not None:
        train_w = torch.cat([torch.full((windows, 1), int(bos), dtype=train_w.dtype), train_w], 1)
        held_w = torch.cat([torch.full((m, 1), int(bos), dtype=held_w.dtype), held_w], 1)
    return train_w, held_w


def cache_key(teacher_digest: str, text_digest: str, options: dict[str, Any]) -> str:
    return sha256_json(
        {"v": CACHE_VERSION, "teacher": teacher_digest, "text": text_digest, **options}
    )[7:39]


def load_cached(path: Path) -> Targets | None:
    if not path.exists():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(path)
    except (SafetensorError, OSError):
        return None  # a damaged cache entry is recomputed, never trusted
    os.utime(path)  # recently used: the last entry pruning removes
    return Targets(
        t["train_ids"],
        t["held_ids"],
        t["topk_values"],
        t["topk_indices"].long(),
        t["held_logprobs"],
    )


def save_cached(path: Path, targets: Targets) -> None:
    from safetensors.torch import save

    assert targets.topk_values is not None and targets.topk_indices is not None
    data = save(
        {
            "train_ids": targets.train_ids.contiguous(),
            "held_ids": targets.held_ids.contiguous(),
            "topk_values": targets.topk_values.contiguous(),
            "topk_indices": targets.topk_indices.to(dtype=_index_dtype()).contiguous(),
            "held_logprobs": targets.held_logprobs.contiguous(),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    prune_cache(path.parent, keep=path, max_bytes=cache_max_bytes())


def _index_dtype() -> Any:
    import torch

    return torch.int32


def teacher_outputs(
    teacher: Any, train_ids: torch.Tensor, held_ids: torch.Tensor, top_k: int, temperature: float
) -> Targets:
    """One pass of the teacher over every window (no gradients)."""
    import torch

    vals, idxs, held = [], [], []
    with torch.no_grad():
        if top_k:
            for s in range(0, train_ids.shape[0], BATCH):
                logits = teacher(input_ids=train_ids[s : s + BATCH], use_cache=False).logits
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                v, i = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1)
                vals.append(v)
                idxs.append(i)
        for s in range(0, held_ids.shape[0], BATCH):
            logits = teacher(input_ids=held_ids[s : s + BATCH], use_cache=False).logits
            held.append(torch.log_softmax(logits.float(), dim=-1).to(torch.float16))
    return Targets(
        train_ids,
        held_ids,
        torch.cat(vals) if vals else None,
        torch.cat(idxs) if idxs else None,
        torch.cat(held),
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    teacher_indices: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher || student) per token at `temperature`, times T^2 (Hinton et al. 2015) so the
    gradient scale does not shrink with T.

    Full targets (`teacher_indices` None): `teacher` holds logits. Top-k targets: `teacher`
    holds the teacher's log-probabilities (already at `temperature`) of its k best tokens, and
    the rest of the vocabulary is one more bucket on both sides. Renormalising the teacher over
    its k tokens instead would teach the student to be overconfident whenever the teacher is
    not; the bucketed KL is a lower bound of the full one that is zero only when the student
    matches the teacher's top-k probabilities and their total."""
    import torch

    s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_indices is None:
        t_logp = torch.log_softmax(teacher.float() / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    else:
        s_k = s_logp.gather(-1, teacher_indices)
        t_k = teacher.float()
        kl = (t_k.exp() * (t_k - s_k)).sum(-1)
        t_rest = _log_rest(t_k)
        s_rest = _log_rest(s_k)
        kl = kl + t_rest.exp() * (t_rest - s_rest)
    return kl.mean() * temperature * temperature


def _log_rest(logp_k: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp_k))): the log-probability of every token outside the top k."""
    import torch

    top = torch.logsumexp(logp_k, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(top)).clamp(min=-60.0)


def heldout_kld(model: Any, held_ids: torch.Tensor, held_logprobs: torch.Tensor) -> float:
    """Mean per-token KL(teacher || model) over the held-out windows, full vocabulary, T=1."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, held_ids.shape[0], BATCH):
            logits = model(input_ids=held_ids[s : s + BATCH], use_cache=False).logits
            q = torch.log_softmax(logits.float(), dim=-1)
            p = held_logprobs[s : s + BATCH].float()
            total += float((p.exp() * (p - q)).sum(-1).sum())
            n += p.shape[0] * p.shape[1]
    return total / max(n, 1)
