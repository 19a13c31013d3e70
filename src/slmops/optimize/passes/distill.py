"""distill: win back what compression lost by training the student on the teacher's logits.

Structured pruning is the compression that really cuts latency and memory, and the one that costs
most quality. Minitron (Muralidharan et al. 2024, arXiv:2407.14679) recovers it by distilling
the logits of the unpruned model into the pruned one; this pass is that second half, sized for a
CPU: the teacher (the model the recipe started from, read from the input's lineage card, or
`teacher:`) runs once over fixed windows of calibration or domain text and its top-k logits are
cached on disk (see _distill_targets), then the student (the pass input) is trained with AdamW on
KL(teacher || student) for a step or time budget. The card reports the KLD to the teacher on
held-out windows before and after, so a recipe shows what distillation bought.

Memory: the teacher is freed before the student trains, so the peak is the student's weights,
gradients and AdamW's two moments (4x the student in fp32) plus activations of one batch; with
`top_k: 0` the teacher stays loaded and gives full-vocabulary targets.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import Field, model_validator

from slmops.core.digest import sha256_file
from slmops.core.errors import ConfigError, ModelFormatError
from slmops.model.arch import ArchInfo
from slmops.model.handle import ModelFormat, ModelHandle, open_model
from slmops.model.hf import load_causal_lm, read_calibration_text, save_causal_lm
from slmops.optimize.passes import _distill_targets as dt
from slmops.optimize.passes import _needs
from slmops.optimize.passes.base import Pass, PassConfig, PassResult

log = logging.getLogger("slmops.optimize.distill")


class DistillConfig(PassConfig):
    content_fields: ClassVar[tuple[str, ...]] = ("teacher", "text")

    teacher: Path | None = Field(
        None,
        description="Hugging Face folder of the teacher (default: the model the recipe started "
        "from, read from the input's lineage card)",
    )
    text: Path | None = Field(
        None,
        description="UTF-8 calibration or domain text (default: the model folder's calibration.txt)",
    )
    steps: int | None = Field(200, ge=1, description="optimizer steps (null: only `minutes`)")
    minutes: float | None = Field(
        10.0, gt=0, description="wall-clock budget for training (null: only `steps`)"
    )
    lr: float = Field(
        3e-5,
        gt=0,
        lt=1,
        description="AdamW learning rate (10-step warmup); small: a pruned student starts close "
        "to its teacher and larger steps add more noise than they remove",
    )
    batch: int = Field(8, ge=1, le=1024, description="windows per optimizer step")
    seqlen: int = Field(
        128, ge=8, le=32768, description="tokens per window (clamped to max_position_embeddings)"
    )
    windows: int = Field(
        128,
        ge=1,
        le=100_000,
        description="training windows drawn from the text (teacher runs once)",
    )
    eval_windows: int = Field(8, ge=1, le=1024, description="held-out windows for before/after KLD")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="tail of the text kept out of training, for the KLD report"
    )
    temperature: float = Field(1.0, gt=0, le=20, description="softmax temperature of the KL loss")
    top_k: int = Field(
        64,
        ge=0,
        description="teacher logits kept per token and cached on disk (0: full logits, "
        "teacher stays in memory, no cache)",
    )
    cache_dir: Path | None = Field(
        None,
        description="where teacher logits are cached (default: ~/.cache/slmops/distill-teacher, "
        "or $SLMOPS_CACHE_DIR/distill-teacher)",
    )
    seed: int = Field(0, ge=0, description="seed for windows and batches")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads (default: the CPUs this process may use)"
    )

    @model_validator(mode="after")
    def _some_budget(self) -> Self:
        if self.steps is None and self.minutes is None:
            raise ValueError("set steps or minutes (or both): training needs a budget")
        return self


class Distill(Pass[DistillConfig]):
    name: ClassVar[str] = "distill"
    version: ClassVar[int] = 2  # 2: windows start with BOS (as evaluation's do)
    summary: ClassVar[str] = (
        "Train the model on its teacher's logits (KL, cached top-k) to win back lost quality"
    )
    kind: ClassVar[str] = "distill"
    input_format: ClassVar[ModelFormat] = ModelFormat.HF
    output_format: ClassVar[ModelFormat] = ModelFormat.HF
    Config = DistillConfig
    tools: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    def prepare(self) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def estimate_output_bytes(self, model: ModelHandle) -> int:
        return model.size_bytes  # same shapes as the input

    @classmethod
    def check(cls, arch: ArchInfo) -> list[str]:
        missing = _needs.causal_lm(arch)
        if not arch.tokenizer_files:
            missing.append(
                "a tokenizer (tokenizer.json or tokenizer.model) shared with the teacher"
            )
        return missing

    def run(self, model: ModelHandle, out_dir: Path) -> PassResult:
        import torch

        from slmops.adapt.budget import Budget, set_torch_threads

        cfg = self.config
        threads = set_torch_threads(cfg.threads)
        teacher = _resolve_teacher(model, cfg.teacher)
        _check_same_vocab(teacher, model)
        text, text_path = read_calibration_text(cfg.text, model.path)
        max_pos = model.hf_config().get("max_position_embeddings")
        seqlen = min(cfg.seqlen, int(max_pos)) if max_pos else cfg.seqlen
        options = {
            "windows": cfg.windows,
            "eval_windows": cfg.eval_windows,
            "seqlen": seqlen,
            "heldout_fraction": cfg.heldout_fraction,
            "seed": cfg.seed,
            "top_k": cfg.top_k,
            "temperature": cfg.temperature,
        }
        text_digest = sha256_file(text_path)
        cache_file = (cfg.cache_dir or dt.default_cache_dir()) / (
            dt.cache_key(teacher.digest, text_digest, options) + ".safetensors"
        )
        teacher_lm = None
        targets = dt.load_cached(cache_file) if cfg.top_k else None
        source = "cache" if targets is not None else "computed"
        teacher_windows = 0
        if targets is None:
            train_ids, held_ids = dt.split_windows(
                model.path,
                text,
                windows=cfg.windows,
                eval_windows=cfg.eval_windows,
                seqlen=seqlen,
                heldout_fraction=cfg.heldout_fraction,
                seed=cfg.seed,
                where=text_path,
            )
            teacher_lm = load_causal_lm(teacher.path)
            targets = dt.teacher_outputs(
                teacher_lm, train_ids, held_ids, cfg.top_k, cfg.temperature
            )
            teacher_windows = (train_ids.shape[0] if cfg.top_k else 0) + held_ids.shape[0]
            if cfg.top_k:
                dt.save_cached(cache_file, targets)
                del teacher_lm  # the teacher is not needed again: free it before training
                teacher_lm = None
                gc.collect()
            else:
                source = "live"
        student = load_causal_lm(model.path)
        kld_before = dt.heldout_kld(student, targets.held_ids, targets.held_logprobs)
        torch.manual_seed(cfg.seed)
        student.train()
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        budget = Budget(cfg.steps, cfg.minutes)
        losses: list[float] = []
        n = targets.train_ids.shape[0]
        while not budget.exhausted():
            idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
            ids = targets.train_ids[idx]
            logits = student(input_ids=ids, use_cache=False).logits
            if teacher_lm is not None:
                with torch.no_grad():
                    t_logits, t_idx = teacher_lm(input_ids=ids, use_cache=False).logits, None
            else:
                assert targets.topk_values is not None and targets.topk_indices is not None
                t_logits, t_idx = targets.topk_values[idx], targets.topk_indices[idx]
            loss = dt.kd_loss(logits, t_logits, t_idx, cfg.temperature)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            budget.done += 1
            losses.append(float(loss.detach()))
            if budget.done % 25 == 0:
                log.info("distill step %d: loss %.4f", budget.done, losses[-1])
        student.eval()
        kld_after = dt.heldout_kld(student, targets.held_ids, targets.held_logprobs)
        save_causal_lm(student, model.path, out_dir)
        params = sum(p.numel() for p in student.parameters())
        report: dict[str, Any] = {
            "teacher": str(teacher.path),
            "teacher_digest": teacher.digest,
            "text": text_path.name,
            "text_digest": text_digest,
            "teacher_logits": source,
            "teacher_forward_windows": teacher_windows,
            "teacher_cache": str(cache_file) if cfg.top_k else None,
            "train_windows": int(n),
            "heldout_windows": int(targets.held_ids.shape[0]),
            "seqlen": seqlen,
            "steps": budget.done,
            "train_seconds": round(budget.elapsed, 2),
            "stopped_by": budget.stopped_by(),
            "threads": threads,
            "loss_first": round(losses[0], 5) if losses else None,
            "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 5) if losses else None,
            "kld_before": round(kld_before, 6),
            "kld_after": round(kld_after, 6),
            "kld_recovered": round(1 - kld_after / kld_before, 4) if kld_before > 0 else None,
            "kld_protocol": "mean per-token KL(teacher || model), full vocabulary, T=1, on "
            "held-out windows from the tail of the text",
            "student_fp32_bytes": params * 4,
        }
        return PassResult(report=report)


def _resolve_teacher(model: ModelHandle, explicit: Path | None) -> ModelHandle:
    """The named teacher, else the origin recorded in the input's card."""
    if explicit is not None:
        path, where = explicit, "pass option teacher"
    elif model.card is not None and model.card.origin_path:
        path, where = Path(model.card.origin_path), f"{model.path}/slmops-card.json origin_path"
    else:
        raise ConfigError(
            "no teacher: the input has no lineage card naming the model the chain started from",
            where=model.path,
            hint="put distill after a compression pass in a recipe (e.g. prune-structured), "
            "or set the option `teacher` to the original Hugging Face folder",
        )
    if path.resolve() == model.path.resolve():
        raise ConfigError(
            "the teacher is the student itself; distillation would change nothing",
            where=where,
            hint="run distill after a compression pass, or set `teacher` to the original model",
        )
    try:
        teacher = open_model(path)
    except ModelFormatError as exc:
        raise ConfigError(
            f"teacher is not a usable model: {exc.message}",
            where=f"{where} ({path})",
            hint="set the option `teacher` to a Hugging Face model folder",
        ) from None
    if teacher.format is not ModelFormat.HF:
        raise ConfigError(
            f"the teacher must be a Hugging Face model, got {teacher.format}",
            where=f"{where} ({path})",
            hint="set the option `teacher` to the original Hugging Face folder",
        )
    return teacher


def _check_same_vocab(teacher: ModelHandle, student: ModelHandle) -> None:
    """KL over logits compares token by token: both must number tokens the same way."""
    t_rows = teacher.hf_config().get("vocab_size")
    s_rows = student.hf_config().get("vocab_size")
    problems = []
    if t_rows != s_rows:
        problems.append(f"vocab_size {t_rows} (teacher) vs {s_rows} (student)")
    for name in ("tokenizer.json", "tokenizer.model"):
        a, b = teacher.path / name, student.path / name
        if a.exists() != b.exists() or (a.exists() and sha256_file(a) != sha256_file(b)):
            problems.append(f"{name} differs")
    if problems:
        raise ConfigError(
            "teacher and student do not share a tokenizer: " + "; ".join(problems),
            where=teacher.path,
            hint="distill from the model the student was derived from (same tokenizer and "
            "vocabulary)",
        )
