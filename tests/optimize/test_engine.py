"""The recipe engine: caching, lineage chains, atomic outputs, kill -9 safety, disk checks."""

import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from slmops.core.errors import ResourceError
from slmops.model.card import read_card
from slmops.model.handle import open_model
from slmops.optimize.engine import run_recipe
from slmops.optimize.recipe import load_recipe

RECIPE = """
name: test
variants:
  f16:
    - export-gguf: {outtype: f16}
  q8:
    - export-gguf: {outtype: f16}
    - quantize-gguf: {type: %s}
"""


def _recipe(tmp_path: Path, qtype: str = "Q8_0") -> Path:
    f = tmp_path / f"recipe-{qtype}.yaml"
    f.write_text(RECIPE % qtype)
    return f


def test_run_cache_and_lineage(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.perf_counter()
    run = run_recipe(tiny_model, load_recipe(_recipe(tmp_path)), out)
    first = time.perf_counter() - t0
    f16, q8 = run.variants
    # the shared export step ran once: the second variant found it cached
    assert not f16.steps[0].cached and q8.steps[0].cached
    assert f16.steps[0].key == q8.steps[0].key
    assert q8.weights_bytes < f16.weights_bytes < run.fp32_bytes

    card = read_card(out / "q8")
    assert card is not None and card.variant == "q8" and card.format == "gguf"
    assert [s.pass_name for s in card.chain] == ["export-gguf", "quantize-gguf"]
    assert card.chain[0].input_digest == open_model(tiny_model).digest == card.origin_digest
    assert card.chain[1].input_digest == card.chain[0].output_digest
    assert card.chain[1].output_digest == card.digest == open_model(out / "q8").digest
    assert card.quantization == "Q8_0"
    step = card.chain[0]
    assert step.peak_rss_bytes >= step.baseline_rss_bytes > 0 and step.wall_time_s > 0
    assert "llama-cpp-python" in step.tool_versions and step.config["outtype"] == "f16"

    t1 = time.perf_counter()
    again = run_recipe(tiny_model, load_recipe(_recipe(tmp_path)), out)
    assert all(v.cached for v in again.variants)
    assert time.perf_counter() - t1 < 0.25 * first

    # changing one option re-runs only the step it determines
    changed = run_recipe(tiny_model, load_recipe(_recipe(tmp_path, "Q4_0")), out)
    assert changed.variants[1].steps[0].cached and not changed.variants[1].steps[1].cached
    assert read_card(out / "q8").quantization == "Q4_0"  # type: ignore[union-attr]


def test_disk_full_is_refused_before_work(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Narrow seam: the machine's disk cannot be filled in a test, so the free-space probe is faked.
    import shutil

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(ResourceError, match="not enough disk space"):
        run_recipe(tiny_model, load_recipe(_recipe(tmp_path)), out)
    assert not (out / "f16").exists()


def test_out_inside_model_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from slmops.core.errors import UserInputError

    with pytest.raises(UserInputError, match="must not be the model directory"):
        run_recipe(tiny_model, load_recipe(_recipe(tmp_path)), tiny_model / "variants")


def _complete_dirs_have_cards(root: Path) -> None:
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith((".slmops-tmp", ".cache")) and d.name != "logs":
            assert read_card(d) is not None, f"{d} looks complete but has no card"


def test_kill_9_midway_then_rerun(tiny_model: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "variants:\n  a:\n    - export-gguf: {outtype: f16}\n  b:\n    - export-onnx: {precision: fp32}\n"
        "  c:\n    - export-onnx: {precision: int4}\n"
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "slmops.cli.main",
        "optimize",
        str(tiny_model),
        "-r",
        str(recipe),
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    cache = out / ".cache"
    deadline = time.time() + 120
    # wait until a later step is in flight (a temp dir exists while variant a is already done)
    while time.time() < deadline:
        temps = [p for p in cache.glob(".slmops-tmp-*")] if cache.exists() else []
        if temps and (out / "a").exists():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the run never reached its second step")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _complete_dirs_have_cards(out)
    _complete_dirs_have_cards(cache)
    assert not (out / "b").exists() or read_card(out / "b") is not None

    rerun = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for v in ("a", "b", "c"):
        assert read_card(out / v) is not None
    assert not list(cache.glob(".slmops-tmp-*")), "stale temp dirs are cleaned on the next run"


def test_concurrent_run_on_same_out_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    import fcntl

    from slmops.core.errors import UserInputError

    out = tmp_path / "out"
    out.mkdir()
    with (out / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(UserInputError, match="another slmops optimize"):
            run_recipe(tiny_model, load_recipe(_recipe(tmp_path)), out)


def test_step_cache_keys_on_the_content_of_files_options_name(tmp_path: Path) -> None:
    """Editing calibration text in place must miss the cache; steps without such options keep
    the key they always had."""
    from slmops.optimize.engine import step_key

    text = tmp_path / "calib.txt"
    text.write_text("first version of the domain text", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nvariants:\n  w:\n"
        f"    - prune-wanda: {{sparsity: 0.5, calibration: {text}}}\n"
        "  g:\n    - export-gguf: {outtype: f16}\n"
    )
    wanda, gguf = (load_recipe(recipe).variants[v][0] for v in ("w", "g"))
    before, plain = step_key("sha256:" + "0" * 64, wanda), step_key("sha256:" + "0" * 64, gguf)
    text.write_text("second version of the domain text", encoding="utf-8")
    assert step_key("sha256:" + "0" * 64, wanda) != before
    assert step_key("sha256:" + "0" * 64, gguf) == plain
    assert gguf.pass_.config.content_digests() == {}
