"""The perf harness on real tiny GGUF and ONNX variants: pinned, watched, never raising."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from slmops.core.errors import UserInputError
from slmops.evaluate.perf import (
    direct_decode_tps,
    interleaved_order,
    measure,
    measure_interleaved,
    pinned_cpus,
    run_pinned,
)
from slmops.evaluate.profiles import Budgets, CostModel, DeviceProfile
from slmops.evaluate.schema import Stat
from slmops.model.handle import open_model
from slmops.optimize.passes.base import build_pass

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n"


def _export(root: Path, tiny_model: Path, name: str, options: dict[str, str]) -> Path:
    p = build_pass(name, options)
    p.prepare()
    out = root / name
    out.mkdir()
    p.run(open_model(tiny_model), out)
    return out


@pytest.fixture(scope="module")
def variants(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("perf-variants")
    return {
        "gguf": _export(root, tiny_model, "export-gguf", {"outtype": "f16"}),
        "onnx": _export(root, tiny_model, "export-onnx", {"precision": "int4"}),
    }


def _profile(cores: int = 1, ram_mb: int = 4096) -> DeviceProfile:
    return DeviceProfile(
        name="test-box",
        arch="x86_64",
        cores=cores,
        ram_mb=ram_mb,
        storage_mb=4096,
        runtimes=["gguf", "onnx-genai"],
        context_length=1024,
        prompt_tokens=32,
        relative_speed=0.5,
        budgets=Budgets(max_ttft_ms=1000, min_decode_tps=1, max_kld=1),
        cost=CostModel(hardware_usd=100, lifetime_years=5, power_watts=5),
    )


@pytest.mark.parametrize(
    ("fmt", "cores", "runtime"), [("gguf", 1, "llama.cpp"), ("onnx", 64, "onnxruntime-genai")]
)
def test_measure_ok(variants: dict[str, Path], fmt: str, cores: int, runtime: str) -> None:
    res = measure(fmt, variants[fmt], _profile(cores), text=TEXT, repeats=2, max_tokens=16)
    assert res.status == "ok", res.detail
    assert res.runtime == runtime and res.repeats == 2
    assert res.threads == min(cores, len(os.sched_getaffinity(0)))
    for stat in (res.ttft_ms, res.decode_tps):  # the load happens once: see perf_child
        assert stat is not None and stat.n == 2 and 0 < stat.min <= stat.median <= stat.max
    assert res.load_time_s is not None and res.load_time_s.median > 0
    assert res.peak_rss_bytes is not None and res.peak_rss_bytes.median > 10 * 1024 * 1024
    assert res.decode_tps is not None and res.ttft_ms is not None
    assert res.projected_decode_tps == pytest.approx(res.decode_tps.median * 0.5)
    assert res.projected_ttft_ms == pytest.approx(res.ttft_ms.median / 0.5)
    assert res.memory_ceiling_bytes == 4096 * 1024 * 1024
    assert res.memory_at_context_bytes is not None and res.memory_at_context_bytes > 0
    assert f"{res.threads} threads" in res.measured_on


def test_child_runs_pinned_with_matching_threads(variants: dict[str, Path]) -> None:
    cpus = pinned_cpus(1)
    spec = {
        "variant_dir": str(variants["gguf"]),
        "threads": 1,
        "n_ctx": 128,
        "prompt_tokens": 8,
        "max_tokens": 4,
        "repeats": 1,
        "text": TEXT,
    }
    run = run_pinned(spec, cpus, 4096 * 1024 * 1024, timeout_s=120)
    assert run.result is not None and run.result["status"] == "ok", run.result
    assert run.result["affinity"] == cpus
    assert run.result["threads"] == 1 and run.result["prompt_tokens"] == 8
    assert run.result["generated"] == [4]  # stop_at_eos=False: every variant decodes the same count


def test_memory_ceiling_gives_does_not_fit(variants: dict[str, Path]) -> None:
    # a Python process with a runtime loaded is well above 20 MiB
    res = measure("gguf", variants["gguf"], _profile(ram_mb=20), text=TEXT, repeats=1)
    assert res.status == "does-not-fit"
    assert "exceeded the 20 MiB available on test-box" in res.detail
    assert res.peak_rss_bytes is not None and res.peak_rss_bytes.max > 20 * 1024 * 1024
    assert res.decode_tps is None


def test_truncated_gguf_is_an_error_row(variants: dict[str, Path], tmp_path: Path) -> None:
    data = next(variants["gguf"].glob("*.gguf")).read_bytes()
    (tmp_path / "model.gguf").write_bytes(data[: len(data) // 2])
    res = measure("broken", tmp_path, _profile(), text=TEXT, repeats=1)
    assert res.status == "error" and "model.gguf" in res.detail
    assert res.runtime == "llama.cpp"


def test_model_that_fails_to_load_in_the_child_is_an_error_row(
    variants: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "onnx"
    shutil.copytree(variants["onnx"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    res = measure("broken", broken, _profile(), text=TEXT, repeats=1)
    assert res.status == "error"
    assert "cannot load the model" in res.detail


def test_timeout_is_an_error_row(variants: dict[str, Path]) -> None:
    res = measure("slow", variants["onnx"], _profile(), text=TEXT, timeout_s=0.05)
    assert res.status == "error" and "timed out" in res.detail


def test_direct_decode_tps_runs_in_process(variants: dict[str, Path]) -> None:
    assert direct_decode_tps(variants["gguf"], 1, [0, 5, 6, 7], 8, n_ctx=64, repeats=1) > 0


def test_bad_arguments_are_refused(variants: dict[str, Path]) -> None:
    with pytest.raises(UserInputError, match="repeats=0"):
        measure("x", variants["gguf"], _profile(), text=TEXT, repeats=0)


def test_interleaved_order_alternates_rounds() -> None:
    names = ["a", "b", "c"]
    rounds = [interleaved_order(names, r) for r in range(4)]
    assert rounds == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    # over an even number of rounds every variant's mean position is the same
    assert {sum(r.index(n) for r in rounds) for n in names} == {4}
    assert names == ["a", "b", "c"], "the caller's list is not reordered"


def test_spread_and_unstable_marking() -> None:
    steady = Stat.of([100.0, 105.0, 95.0])
    assert steady.spread == pytest.approx(0.10) and not steady.unstable  # 10 % is not > 10 %
    shaky = Stat.of([100.0, 121.0, 95.0])
    assert shaky.spread == pytest.approx(0.26) and shaky.unstable
    assert shaky.values == [100.0, 121.0, 95.0]
    assert not Stat.of([5.0]).unstable and Stat.of([5.0]).spread == 0
    # reports written before these fields existed still load
    old = Stat.model_validate({"median": 1.0, "min": 0.5, "max": 2.0, "n": 3})
    assert old.values == [] and old.unstable


def test_interleaved_measurement_alternates_and_sums_decode_time(
    variants: dict[str, Path],
) -> None:
    items = [("gguf", variants["gguf"]), ("onnx", variants["onnx"])]
    res = measure_interleaved(
        items, _profile(1), text=TEXT, repeats=3, max_tokens=16, min_decode_s=0.05
    )  # three rounds: A B, B A, A B
    assert [r.variant for r in res] == ["gguf", "onnx"]
    assert res[0].order == [0, 1, 0] and res[1].order == [1, 0, 1]
    for r in res:
        assert r.status == "ok", r.detail
        assert r.decode_tps is not None and r.decode_tps.n == 3 and len(r.decode_tps.values) == 3
        assert r.load_time_s is not None and r.load_time_s.n == 3  # one child per round
        # a 16-token run lasts a few ms: several runs are summed until 50 ms of decoding
        assert r.decode_tokens is not None and r.decode_tokens > 15
        assert r.unstable == [k for k in ("decode_tps", "ttft_ms") if getattr(r, k).unstable]


def test_one_failing_variant_leaves_the_others_interleaved(
    variants: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "onnx"
    shutil.copytree(variants["onnx"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")  # fails in the child, not before
    items = [("broken", broken), ("gguf", variants["gguf"])]
    res = measure_interleaved(items, _profile(1), text=TEXT, repeats=2, max_tokens=8)
    assert res[0].status == "error" and "cannot load the model" in res[0].detail
    assert res[0].order == [0], "dropped after its first round"
    assert res[1].order == [1, 0] and res[1].status == "ok"
    assert res[1].decode_tps is not None and res[1].decode_tps.n == 2


def test_timed_repeat_decodes_at_least_min_decode_tokens(variants: dict[str, Path]) -> None:
    # 16-token runs (15 decoded each) until 100 tokens, with no floor in seconds
    res = measure(
        "gguf",
        variants["gguf"],
        _profile(1),
        text=TEXT,
        repeats=2,
        max_tokens=16,
        min_decode_s=0,
        min_decode_tokens=100,
    )
    assert res.status == "ok", res.detail
    assert res.decode_tokens == 105  # seven runs: the first run reaching 100 ends the repeat
    with pytest.raises(UserInputError, match="min_decode_tokens=-1"):
        measure("x", variants["gguf"], _profile(), text=TEXT, min_decode_tokens=-1)


def test_token_floor_gives_way_to_a_slow_model(
    variants: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a starved or slow model must not run into the harness's timeout chasing the token floor
    from slmops.evaluate import perf_child
    from slmops.runtimes import open_runtime

    monkeypatch.setattr(perf_child, "TOKEN_FLOOR_MAX_S", 0.05)
    rt = open_runtime(variants["gguf"], threads=1, n_ctx=128)
    try:
        ids = perf_child.build_prompt(rt, TEXT, 8)
        r = perf_child.timed_repeat(rt, ids, 16, 0.0, min_decode_tokens=10**9)
    finally:
        rt.close()
    assert r["runs"] < 1000, "stopped by TOKEN_FLOOR_MAX_S, not by max_runs"
    assert r["decode_tokens"] / r["decode_tps"] >= 0.05
