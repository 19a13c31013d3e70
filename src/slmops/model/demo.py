"""Build the demo model: a byte-level BPE tokenizer and a small Llama trained on stdlib docstrings.

No model hub is reachable, so slmops makes its own realistic model: a real tokenizer, a real
Llama architecture (GQA, RoPE, SwiGLU) with dimensions that the GGUF k-quants accept, and real
training. The result is a plain Hugging Face folder that every pass treats like a downloaded model.

Determinism: the output is a function of (seed, steps, model size, corpus). The time budget
(`minutes`) is turned into a step count with a fixed rate, so a slower machine takes longer but
produces the same weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmops.core.atomic import atomic_directory, link_or_copy_tree, write_text_atomic
from slmops.core.digest import sha256_json
from slmops.core.errors import UserInputError
from slmops.model.demo_corpus import build_corpus

DEMO_STAMP = "slmops-demo.json"
STEPS_PER_MINUTE = 90  # measured on a 2-core machine for the "small" size, batch 16 x 128 tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class DemoSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 512
    seq_len: int = 128
    batch_size: int = 16
    corpus_chars: int | None = None  # None: the whole stdlib


SIZES = {
    # 6.8 M parameters: hidden 256 and FFN 768 are multiples of 256, so GGUF k-quants apply.
    "small": DemoSize(4096, 256, 768, 6, 8, 4),
    # For tests: seconds to build, same architecture features (GQA, untied head).
    "tiny": DemoSize(
        512,
        64,
        128,
        2,
        4,
        2,
        max_position_embeddings=256,
        seq_len=64,
        batch_size=8,
        corpus_chars=300_000,
    ),
}


@dataclass
class DemoResult:
    path: Path
    cached: bool
    parameters: int
    steps: int
    train_seconds: float
    heldout_perplexity: float
    key: str


def default_cache_dir() -> Path:
    import os

    return (
        Path(os.environ.get("SLMOPS_CACHE_DIR", Path.home() / ".cache" / "slmops")) / "demo-models"
    )


def build_tokenizer(text: str, vocab_size: int, out: Path) -> None:
    """Train a byte-level BPE tokenizer and save it as an HF fast tokenizer with BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _config(size: DemoSize, tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _perplexity(model: Any, ids: Any, seq_len: int, max_windows: int = 32) -> float:
    import torch

    losses = []
    with torch.no_grad():
        for start in range(0, min(ids.numel() - 1, max_windows * seq_len), seq_len):
            chunk = ids[start : start + seq_len + 1]
            if chunk.numel() < 2:
                break
            out = model(chunk[None, :-1], labels=chunk[None, :-1])
            losses.append(float(out.loss))
    return math.exp(sum(losses) / len(losses)) if losses else float("nan")


def train_demo_model(
    out: Path,
    *,
    minutes: float = 3.0,
    seed: int = 0,
    size: str = "small",
    steps: int | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> DemoResult:
    """Build (or reuse from cache) the demo model and place it at `out`."""
    if size not in SIZES:
        raise UserInputError(
            f"unknown demo size {size!r}", hint="choose one of: " + ", ".join(SIZES)
        )
    if minutes <= 0 and steps is None:
        raise UserInputError("--minutes must be positive", hint="for example --minutes 3")
    dims = SIZES[size]
    n_steps = (
        steps
        if steps is not None
        else max(1, round(minutes * STEPS_PER_MINUTE * (1 if size == "small" else 8)))
    )
    key = sha256_json({"v": 1, "seed": seed, "steps": n_steps, "size": asdict(dims)})[7:23]

    stamp = _read_stamp(out)
    if stamp and stamp.get("key") == key:
        return _result(out, stamp, cached=True)
    cache = (cache_dir or default_cache_dir()) / key
    trained = False
    if not _read_stamp(cache):
        with atomic_directory(cache, replace=True) as tmp:
            _train_into(tmp, dims, n_steps, seed, key, progress)
        trained = True
    with atomic_directory(out, replace=True) as tmp:
        link_or_copy_tree(cache, tmp)
    stamp = _read_stamp(out) or {}
    return _result(out, stamp, cached=not trained)


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / DEMO_STAMP).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def _result(path: Path, stamp: dict[str, Any], *, cached: bool) -> DemoResult:
    return DemoResult(
        path=path,
        cached=cached,
        parameters=int(stamp["parameters"]),
        steps=int(stamp["steps"]),
        train_seconds=float(stamp["train_seconds"]),
        heldout_perplexity=float(stamp["heldout_perplexity"]),
        key=str(stamp["key"]),
    )


def _train_into(
    out: Path,
    dims: DemoSize,
    n_steps: int,
    seed: int,
    key: str,
    progress: Callable[[int, int, float], None] | None,
) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from slmops.model.hf import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    corpus = build_corpus(limit_chars=dims.corpus_chars)
    build_tokenizer(corpus.train, dims.vocab_size, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.model_max_length = 1 << 30  # tokenizing the whole corpus at once is intended
    model = LlamaForCausalLM(_config(dims, out))
    ids = tok(corpus.train, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    held = tok(corpus.heldout, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, n_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, n_steps) / n_steps))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(n_steps):
        starts = torch.randint(0, ids.numel() - dims.seq_len - 1, (dims.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + dims.seq_len] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress(step + 1, n_steps, float(loss.detach()))
    train_seconds = time.perf_counter() - t0
    model.eval()  # type: ignore[no-untyped-call]
    ppl = _perplexity(model, held, dims.seq_len)
    model.generation_config.max_new_tokens = 64
    model.save_pretrained(out, safe_serialization=True)
    write_text_atomic(out / "heldout.txt", corpus.heldout)
    write_text_atomic(out / "calibration.txt", corpus.calibration)
    stamp = {
        "key": key,
        "seed": seed,
        "steps": n_steps,
        "size": asdict(dims),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 2),
        "heldout_perplexity": round(ppl, 3),
        "heldout_protocol": f"token perplexity, non-overlapping windows of {dims.seq_len}, first 32 windows",
        "corpus": {
            "files": corpus.files,
            "docstrings": corpus.docstrings,
            "train_chars": len(corpus.train),
        },
    }
    write_text_atomic(out / DEMO_STAMP, json.dumps(stamp, indent=2) + "\n")
