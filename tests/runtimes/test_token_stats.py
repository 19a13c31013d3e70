"""Per-token quality proxies while streaming (log-probability, entropy) on the real runtimes."""

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from slmops.model.handle import open_model
from slmops.optimize.passes.base import build_pass
from slmops.protocol.telemetry import BOUNDS, bucket_counts
from slmops.runtimes import Runtime, TokenStats, open_runtime
from slmops.runtimes.base import token_stats


def _export(src: Path, out: Path, name: str, opts: dict[str, str]) -> Path:
    out.mkdir(parents=True)
    p = build_pass(name, opts)
    p.prepare()
    p.run(open_model(src), out)
    return out


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("token-stats")
    return {
        "llama.cpp": _export(tiny_model, root / "gguf", "export-gguf", {"outtype": "f16"}),
        "onnxruntime-genai": _export(
            tiny_model, root / "onnx", "export-onnx", {"precision": "int4"}
        ),
        "transformers": tiny_model,
    }


@pytest.fixture(params=["llama.cpp", "onnxruntime-genai", "transformers"])
def runtime(request: pytest.FixtureRequest, models: dict[str, Path]) -> Iterator[Runtime]:
    rt = open_runtime(models[request.param], threads=2, n_ctx=256)
    assert rt.name == request.param
    yield rt
    rt.close()


def _prompt(rt: Runtime) -> list[int]:
    bos = [rt.bos_id] if rt.bos_id is not None else []
    return bos + rt.tokenize("The module provides functions to")


def test_greedy_stream_is_unchanged_and_stats_are_sane(runtime: Runtime) -> None:
    ids = _prompt(runtime)
    plain = list(runtime.stream(ids, 24))
    stats = TokenStats()
    with_stats = list(runtime.stream(ids, 24, stats=stats))
    assert with_stats == plain
    assert runtime.detokenize(with_stats) == runtime.detokenize(plain)
    assert stats.count == len(plain) == len(stats.entropies)
    lp, ent = np.array(stats.logprobs), np.array(stats.entropies)
    assert np.isfinite(lp).all() and np.isfinite(ent).all()
    assert (lp <= 0).all() and (ent >= 0).all()
    assert (ent <= math.log(runtime.vocab_size) + 0.1).all()
    assert stats.logprob_mean == pytest.approx(float(lp.mean()))
    assert stats.entropy_mean == pytest.approx(float(ent.mean()))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stats_are_those_of_the_distribution_each_token_was_drawn_from(
    runtime: Runtime, temperature: float
) -> None:
    """Against a fresh scoring pass over prompt + output: each token's logprob and entropy come
    from the logits at the position before it (sampling makes an off-by-one show)."""
    ids = _prompt(runtime)
    stats = TokenStats()
    out = list(runtime.stream(ids, 16, temperature, stats=stats))
    full = runtime.logits(ids + out)
    expect = [token_stats(full[len(ids) - 1 + i], t) for i, t in enumerate(out)]
    assert stats.logprobs == pytest.approx([e[0] for e in expect], abs=0.02)
    assert stats.entropies == pytest.approx([e[1] for e in expect], abs=0.02)
    if temperature == 0.0:  # greedy picks the most likely token
        best = [float(np.max(full[len(ids) - 1 + i])) for i in range(len(out))]
        picked = [float(full[len(ids) - 1 + i][t]) for i, t in enumerate(out)]
        assert picked == pytest.approx(best)


def test_token_stats_math() -> None:
    lp, ent = token_stats(np.zeros(512, dtype=np.float32), 7)
    assert lp == pytest.approx(-math.log(512)) and ent == pytest.approx(math.log(512))
    peaked = np.full(100, -50.0, dtype=np.float32)
    peaked[3] = 50.0
    lp, ent = token_stats(peaked, 3)
    assert lp == 0.0 or lp == pytest.approx(0.0, abs=1e-6)
    assert ent == pytest.approx(0.0, abs=1e-6)
    lp, _ = token_stats(peaked, 4)
    assert lp == pytest.approx(-100.0, rel=1e-4)
    p = np.array([0.5, 0.25, 0.25])
    lp, ent = token_stats(np.log(p).astype(np.float16), 1)
    assert lp == pytest.approx(math.log(0.25), abs=1e-3)
    assert ent == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-3)


class _Scripted(Runtime):
    """A fake at the narrowest seam: a 'model' that emits a fixed script of tokens."""

    name = "scripted"
    format = "test"
    script = (5, 6, 1, 7)

    def _load(self) -> None:
        pass

    @property
    def vocab_size(self) -> int:
        return 8

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_ids(self) -> set[int]:
        return {1}

    def tokenize(self, text: str) -> list[int]:
        return []

    def detokenize(self, ids: Sequence[int]) -> str:
        return ""

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def stream(
        self,
        ids: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        *,
        stats: TokenStats | None = None,
    ) -> Iterator[int]:
        for tok in self.script[:max_tokens]:
            if stats is not None:
                stats.add(np.arange(8, dtype=np.float32), tok)
            yield tok


def test_generate_drops_the_stopping_eos_from_stats() -> None:
    rt = _Scripted(Path("."), 1, 16)
    stats = TokenStats(logprobs=[-1.0], entropies=[1.0])  # accumulates across calls
    out, _ = rt.generate([0], 10, stats=stats)
    assert out == [5, 6] and stats.count == 3 and stats.logprobs[0] == -1.0
    out, _ = rt.generate([0], 10, stop_at_eos=False, stats=stats)
    assert out == [5, 6, 1, 7] and stats.count == 7


def test_bucket_counts_follow_the_wire_convention() -> None:
    # bucket i counts values <= bounds[i] (and above bounds[i-1]); the last bucket the rest
    counts = bucket_counts("logprob", [-9.0, -8.0, -7.9, -0.1, -0.05, 0.0])
    assert len(counts) == len(BOUNDS["logprob"]) + 1
    assert counts[0] == 2 and counts[1] == 1 and counts[9] == 1 and counts[10] == 2
    lengths = bucket_counts("output_tokens", [0, 1, 2, 3, 64, 65, 5000])
    assert lengths[0] == 2 and lengths[1] == 1 and lengths[2] == 1 and lengths[6] == 1
    assert lengths[7] == 1 and lengths[-1] == 1 and sum(lengths) == 7
