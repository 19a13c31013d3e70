"""LoRA training on CPU with a step or time budget (PEFT).

The base stays frozen in fp32 and only the low-rank A/B matrices of the decoder projections
train, so the optimizer state is a few percent of the model and the adapter file is small enough
to ship on its own. Training is plain next-token loss on random windows of the site's token
stream (chat examples are rendered with the chat template first, see data.py); the loss covers
every token, prompts included, which suits the short site texts this is meant for.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.adapt.budget import Budget, set_torch_threads
from slmops.model.hf import PROJECTIONS, decoder_linears, load_causal_lm

if TYPE_CHECKING:
    import torch

Progress = Callable[[str, float | None], None]


@dataclass
class TrainOptions:
    steps: int | None = None
    minutes: float | None = 5.0
    rank: int = 8
    alpha: int | None = None  # default: 2 x rank
    lr: float = 1e-3
    batch: int = 8
    seqlen: int = 128
    threads: int | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_stream(tokenizer: Any, units: list[str]) -> torch.Tensor:
    """All units as one token stream, each closed by EOS so the model learns where they end."""
    import torch

    eos = tokenizer.eos_token or ""
    tokenizer.model_max_length = 1 << 30  # tokenizing the whole split at once is intended
    ids = tokenizer("".join(u + eos for u in units), return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ][0]
    return torch.as_tensor(ids)


def target_modules(model: Any) -> list[str]:
    """The projection names present in this model's decoder blocks (q/k/v/o, MLP, fused)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, _ in decoder_linears(model)} & set(PROJECTIONS)
    )


def train_adapter(
    base: Path, train_ids: torch.Tensor, opts: TrainOptions, progress: Progress | None = None
) -> tuple[Any, dict[str, Any]]:
    """A PEFT model (base + trained adapter) and what the card records about the training."""
    import torch
    from peft import LoraConfig, get_peft_model

    threads = set_torch_threads(opts.threads)
    torch.manual_seed(opts.seed)
    model = load_causal_lm(base)
    seqlen = max(8, min(opts.seqlen, train_ids.numel() - 1))
    modules = target_modules(model)
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha or 2 * opts.rank,
        lora_dropout=0.0,
        target_modules=modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        peft_model: Any = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    gen = torch.Generator().manual_seed(opts.seed)
    budget = Budget(opts.steps, opts.minutes)
    losses: list[float] = []
    peft_model.train()
    while not budget.exhausted():
        starts = torch.randint(0, train_ids.numel() - seqlen, (opts.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + seqlen] for s in starts.tolist()])
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        budget.done += 1
        losses.append(float(loss.detach()))
        if progress:
            progress(f"training: step {budget.done}, loss {losses[-1]:.3f}", budget.fraction())
    peft_model.eval()
    report = {
        "steps": budget.done,
        "train_seconds": round(budget.elapsed, 2),
        "stopped_by": budget.stopped_by(),
        "threads": threads,
        "seqlen": seqlen,
        "train_tokens": int(train_ids.numel()),
        "target_modules": modules,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "base_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
    }
    return peft_model, report
