"""Quality metrics on tiny models with the real runtimes."""

import json
from pathlib import Path

import pytest

from slmops.core.errors import ConfigError
from slmops.evaluate import quality as q
from slmops.model.handle import open_model
from slmops.optimize.passes.base import build_pass
from slmops.runtimes import open_runtime


def _chain(src: Path, root: Path, steps: list[tuple[str, dict]]) -> Path:
    cur = src
    for i, (name, opts) in enumerate(steps):
        out = root / f"{i}-{name}"
        out.mkdir(parents=True)
        p = build_pass(name, opts)
        p.prepare()
        p.run(open_model(cur), out)
        cur = out
    return cur


@pytest.fixture(scope="module")
def setup(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("quality")
    ref = open_runtime(tiny_model, threads=2, n_ctx=128)
    text = (tiny_model / "heldout.txt").read_text()
    windows = q.make_windows(ref, text, "heldout.txt", window_tokens=64, max_windows=8)
    scores = q.ReferenceScores(ref, windows)
    prompts = q.greedy_prompts(ref, text, n=4)
    variants = {
        "q8": _chain(
            tiny_model,
            root / "q8",
            [("export-gguf", {"outtype": "f16"}), ("quantize-gguf", {"type": "Q8_0"})],
        ),
        "pruned90": _chain(
            tiny_model,
            root / "p90",
            [("prune-magnitude", {"sparsity": 0.9}), ("export-gguf", {"outtype": "f16"})],
        ),
        "onnx": _chain(tiny_model, root / "onnx", [("export-onnx", {"precision": "int4"})]),
    }
    yield ref, scores, prompts, variants, windows
    scores.close()


def test_reference_against_itself_is_perfect(setup) -> None:
    ref, scores, prompts, _, windows = setup
    res = q.score_variant(ref, scores, reference=ref, prompts=prompts)
    assert res.kld_mean == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0 and res.greedy_agreement == 1.0
    assert res.perplexity == pytest.approx(res.reference_perplexity, rel=1e-6)
    assert windows.protocol.tokens_scored == 8 * (64 - 32 - 1)
    assert "windows of 64 tokens" in windows.protocol.description


def test_heavy_pruning_diverges_more_than_q8(setup) -> None:
    ref, scores, prompts, variants, _ = setup
    results = {}
    for name, path in variants.items():
        rt = open_runtime(path, threads=2, n_ctx=128)
        results[name] = q.score_variant(rt, scores, reference=ref, prompts=prompts)
        rt.close()
    q8, p90, onnx = results["q8"], results["pruned90"], results["onnx"]
    assert 0 <= q8.kld_mean < p90.kld_mean
    assert q8.top1_agreement > p90.top1_agreement
    assert q8.kld_ci95[0] <= q8.kld_mean * 1.5 and q8.kld_ci95[0] <= q8.kld_ci95[1]
    assert p90.perplexity > q8.perplexity
    assert onnx.kld_mean < p90.kld_mean, "int4 ONNX of the same weights beats 90% sparsity"


def test_tasks_jsonl(setup, tmp_path: Path) -> None:
    ref, *_ = setup
    prompt = "Return the"
    bos = [ref.bos_id] if ref.bos_id is not None else []
    out, _ = ref.generate(bos + ref.tokenize(prompt), 8)
    expected = ref.detokenize(out).strip()
    f = tmp_path / "tasks.jsonl"
    f.write_text(
        json.dumps({"prompt": prompt, "expected": expected, "match": "exact"})
        + "\n\n"
        + json.dumps({"prompt": prompt, "expected": "zzzz-never"})
        + "\n"
    )
    tasks = q.load_tasks(f)
    tasks[0] = tasks[0].model_copy(update={"max_tokens": 8})
    assert q.task_accuracy(ref, tasks) == 0.5


def test_bad_inputs(tmp_path: Path) -> None:
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "a", "expected": "b"}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        q.load_tasks(bad)
    bad.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        q.load_tasks(bad)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="too short"):
        q.read_eval_text(short)
    with pytest.raises(ConfigError, match="not found"):
        q.read_eval_text(tmp_path / "missing.txt")


@pytest.mark.parametrize("variant", ["q8", "onnx"])
def test_field_baseline_histograms(setup, variant: str) -> None:
    from slmops.protocol.telemetry import BOUNDS

    _, _, prompts, variants, _ = setup
    rt = open_runtime(variants[variant], threads=2, n_ctx=128)
    try:
        base = q.quality_baseline(rt, prompts, max_tokens=20)
        lengths = [len(rt.generate(p, 20)[0]) for p in prompts]  # greedy: the same outputs
    finally:
        rt.close()
    assert len(base.logprob) == len(BOUNDS["logprob"]) + 1
    assert len(base.output_tokens) == len(BOUNDS["output_tokens"]) + 1
    assert base.prompts == len(prompts) == 4 and base.max_tokens == 20
    assert base.temperature == 0.0
    assert sum(base.output_tokens) == base.prompts
    assert sum(base.logprob) == base.tokens == sum(lengths)
    assert base.logprob_mean is not None and base.logprob_mean <= 0
    assert base.entropy_mean is not None and base.entropy_mean >= 0


def test_score_variant_carries_the_baseline_when_asked(setup) -> None:
    ref, scores, prompts, _, _ = setup
    assert q.score_variant(ref, scores, prompts=prompts).baseline is None
    res = q.score_variant(ref, scores, prompts=prompts, baseline_tokens=8)
    assert res.baseline is not None and res.baseline.prompts == len(prompts)
    assert res.baseline.max_tokens == 8 and sum(res.baseline.logprob) <= 8 * len(prompts)
