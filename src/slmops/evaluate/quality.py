"""Quality against the reference model: KL divergence, top-1 agreement, perplexity, greedy
agreement and an optional task suite, under one named protocol for every runtime.

Protocol (llama.cpp's convention, named in the report): the held-out text is tokenized once by
the reference tokenizer; non-overlapping windows of `window_tokens` tokens (BOS first when the
model has one) are fed to every runtime as token ids; only positions from `scored_from` on are
scored, so each scored token has at least that much context. Feeding ids, not text, keeps
tokenizer quirks (BOS handling in ONNX GenAI) from posing as model differences.

Reference log-probabilities are kept in a float32 memory map on disk, so a 150k-token vocabulary
does not have to fit in RAM beside the variant being scored.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from slmops.core.config import StrictModel
from slmops.core.digest import sha256_bytes
from slmops.core.errors import ConfigError
from slmops.evaluate.schema import QualityProtocol, QualityResult
from slmops.protocol.bundle import QualityBaseline
from slmops.protocol.telemetry import bucket_counts
from slmops.runtimes.base import Runtime, TokenStats

if TYPE_CHECKING:
    import numpy as np


class Task(StrictModel):
    prompt: str
    expected: str
    match: str = Field("contains", pattern="^(exact|contains)$")
    max_tokens: int = Field(32, gt=0, le=512)


def load_tasks(path: Path) -> list[Task]:
    """JSONL: one {"prompt", "expected", "match"?} object per line; errors name the line."""
    if not path.is_file():
        raise ConfigError(
            "task file not found", where=path, hint="pass a JSONL file with prompt/expected"
        )
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"line {n} is not JSON: {exc.msg}", where=path) from None
        tasks.append(Task.from_data(data, source=f"{path}: line {n}"))
    if not tasks:
        raise ConfigError("task file has no tasks", where=path)
    return tasks


def read_eval_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(
            "evaluation text not found", where=path, hint="pass --eval-text FILE (UTF-8 text)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"evaluation text is not UTF-8: {exc}", where=path) from None
    if len(text.strip()) < 200:
        raise ConfigError("evaluation text is too short (under 200 characters)", where=path)
    return text


@dataclass
class Windows:
    ids: list[list[int]]
    scored_from: int
    protocol: QualityProtocol


def make_windows(
    reference: Runtime, text: str, source: str, *, window_tokens: int = 128, max_windows: int = 24
) -> Windows:
    bos = reference.bos_id
    body = window_tokens - (1 if bos is not None else 0)
    ids = reference.tokenize(text)
    n = min(max_windows, len(ids) // body)
    if n < 1:
        raise ConfigError(
            f"evaluation text gives {len(ids)} tokens, fewer than one window of {window_tokens}",
            where=source,
            hint="use a longer held-out text",
        )
    windows = [
        ([bos] if bos is not None else []) + ids[i * body : (i + 1) * body] for i in range(n)
    ]
    scored_from = window_tokens // 2
    protocol = QualityProtocol(
        text_source=source,
        text_digest=sha256_bytes(text.encode("utf-8")),
        windows=n,
        window_tokens=window_tokens,
        scored_from=scored_from,
        tokens_scored=n * (window_tokens - scored_from - 1),
        bos=bos is not None,
        description=(
            f"{n} non-overlapping windows of {window_tokens} tokens"
            f"{' (BOS first)' if bos is not None else ''} from the reference tokenization; "
            f"next-token predictions at positions {scored_from}..{window_tokens - 2} of each window are "
            f"scored (each with >= {scored_from} tokens of context); KLD = KL(reference || variant) in "
            "nats, perplexity = exp(mean NLL of the true next token)"
        ),
    )
    return Windows(windows, scored_from, protocol)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    import numpy as np

    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # type: ignore[no-any-return]


class ReferenceScores:
    """Reference log-probs at scored positions (memory-mapped) and its own perplexity."""

    def __init__(self, reference: Runtime, windows: Windows) -> None:
        import numpy as np

        self.windows = windows
        self.vocab = reference.vocab_size
        per = len(windows.ids[0]) - 1 - windows.scored_from
        self._tmp = tempfile.NamedTemporaryFile(prefix="slmops-ref-", suffix=".f32")  # noqa: SIM115
        self.logp: Any = np.memmap(
            self._tmp.name, dtype=np.float32, mode="w+", shape=(len(windows.ids), per, self.vocab)
        )
        nll = []
        for w, ids in enumerate(windows.ids):
            lp = _log_softmax(
                reference.logits(ids)[windows.scored_from : len(ids) - 1, : self.vocab]
            )
            self.logp[w] = lp
            targets = np.asarray(ids[windows.scored_from + 1 :])
            nll.append(-lp[np.arange(len(targets)), targets])
        self.perplexity = float(math.exp(float(np.concatenate(nll).mean())))

    def close(self) -> None:
        del self.logp
        self._tmp.close()


def score_variant(
    variant: Runtime,
    ref: ReferenceScores,
    *,
    reference: Runtime | None = None,
    prompts: Sequence[Sequence[int]] = (),
    greedy_tokens: int = 32,
    tasks: Sequence[Task] = (),
    seed: int = 0,
    baseline_tokens: int = 0,
) -> QualityResult:
    """Quality of `variant` against the reference; with `baseline_tokens` > 0 and prompts, also
    its field baseline (`quality_baseline`) on the same prompts."""
    import numpy as np

    t0 = time.perf_counter()
    w = ref.windows
    if variant.vocab_size < ref.vocab:
        raise ConfigError(
            f"variant vocabulary ({variant.vocab_size}) is smaller than the reference's ({ref.vocab})",
            hint="compare variants of the same model only",
        )
    kld_w, top1, nll, all_kld = [], [], [], []
    for i, ids in enumerate(w.ids):
        lv = _log_softmax(variant.logits(ids)[w.scored_from : len(ids) - 1, : ref.vocab])
        lr = np.asarray(ref.logp[i])
        # float error can make a near-zero KLD slightly negative; it is a divergence, so clip
        kld = np.maximum((np.exp(lr) * (lr - lv)).sum(axis=-1), 0.0)
        all_kld.append(kld)
        kld_w.append(float(kld.mean()))
        top1.append(float((lr.argmax(-1) == lv.argmax(-1)).mean()))
        targets = np.asarray(ids[w.scored_from + 1 :])
        nll.append(-lv[np.arange(len(targets)), targets])
    flat = np.concatenate(all_kld)
    rng = np.random.default_rng(seed)
    boots = [float(np.mean(rng.choice(kld_w, size=len(kld_w), replace=True))) for _ in range(200)]
    greedy = None
    if prompts and reference is not None:
        greedy = greedy_agreement(reference, variant, prompts, greedy_tokens)
    acc = task_accuracy(variant, tasks) if tasks else None
    base = quality_baseline(variant, prompts, baseline_tokens) if baseline_tokens > 0 else None
    return QualityResult(
        kld_mean=float(flat.mean()),
        kld_p99=float(np.percentile(flat, 99)),
        kld_ci95=(float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))),
        top1_agreement=float(np.mean(top1)),
        perplexity=float(math.exp(float(np.concatenate(nll).mean()))),
        reference_perplexity=ref.perplexity,
        greedy_agreement=greedy,
        greedy_prompts=len(prompts),
        task_accuracy=acc,
        tasks=len(tasks),
        eval_seconds=round(time.perf_counter() - t0, 3),
        baseline=base if base is not None and base.prompts else None,
    )


def quality_baseline(
    runtime: Runtime, prompts: Sequence[Sequence[int]], max_tokens: int = 64
) -> QualityBaseline:
    """The histograms device telemetry reports (token logprob, output tokens per response),
    measured on fixed prompts, for drift detection in the field.

    Greedy (temperature 0), stopping at EOS or `max_tokens`: deterministic, so the baseline is
    reproducible run to run and differences between variants are the models', not sampling
    noise over a few hundred tokens. Log-probabilities are under the raw model distribution, as
    devices report them whatever temperature they serve at (sampled field traffic therefore sits
    somewhat lower than this greedy baseline; compare shapes and shifts, not equality).
    """
    stats = TokenStats()
    lengths = []
    for p in prompts:
        out, _ = runtime.generate(p, max_tokens, stats=stats)
        lengths.append(len(out))
    return QualityBaseline(
        logprob=bucket_counts("logprob", stats.logprobs),
        output_tokens=bucket_counts("output_tokens", lengths),
        prompts=len(prompts),
        max_tokens=max_tokens,
        temperature=0.0,
        tokens=stats.count,
        logprob_mean=stats.logprob_mean,
        entropy_mean=stats.entropy_mean,
    )


def greedy_prompts(
    reference: Runtime, text: str, *, n: int = 8, prompt_tokens: int = 16
) -> list[list[int]]:
    """Prompts from the starts of held-out paragraphs (BOS first when the model has one)."""
    bos = [reference.bos_id] if reference.bos_id is not None else []
    out = []
    for para in (p for p in text.split("\n\n") if len(p) > 80):
        ids = reference.tokenize(para)[:prompt_tokens]
        if len(ids) == prompt_tokens:
            out.append(bos + ids)
        if len(out) == n:
            break
    return out


_greedy_cache: dict[tuple[int, tuple[int, ...], int], list[int]] = {}


def greedy_agreement(
    reference: Runtime, variant: Runtime, prompts: Sequence[Sequence[int]], n: int
) -> float:
    """Position-wise agreement of greedy continuations (each model follows its own output)."""
    agree = total = 0
    for p in prompts:
        key = (id(reference), tuple(p), n)
        if key not in _greedy_cache:
            _greedy_cache[key], _ = reference.generate(p, n, stop_at_eos=False)
        ref_out = _greedy_cache[key]
        var_out, _ = variant.generate(p, n, stop_at_eos=False)
        agree += sum(1 for a, b in zip(ref_out, var_out, strict=False) if a == b)
        total += len(ref_out)
    return agree / total if total else 0.0


def task_accuracy(runtime: Runtime, tasks: Sequence[Task]) -> float:
    bos = [runtime.bos_id] if runtime.bos_id is not None else []
    ok = 0
    for t in tasks:
        out, _ = runtime.generate(bos + runtime.tokenize(t.prompt), t.max_tokens)
        text = runtime.detokenize(out).strip()
        expected = t.expected.strip()
        ok += int(text == expected if t.match == "exact" else expected in text)
    return ok / len(tasks)
