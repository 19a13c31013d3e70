"""The per-site adapter step of `slmops demo` (cli/demo_adapters.py), tested by its parts: the
whole demo is too slow for the suite (the step alone runs in ~90 s with a fleet; measured figures
are in the README).

The corpora are offline and disjoint, and the perplexity the demo prints (llama.cpp on the
device's files) is the one `slmops adapt` measures in torch, with and without the adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import slmops.cli.demo_adapters as step
from helpers import run_pass
from slmops.core.errors import UserInputError


def test_site_corpora_are_offline_and_disjoint(tmp_path: Path) -> None:
    texts = {s: step.make_corpus(s, tmp_path / f"{s}.txt").read_text() for s in step.CORPORA}
    north, south = texts["north"], texts["south"]
    assert len(north) > 5000 and len(south) > 5000
    paras = [{p.strip() for p in t.split("\n\n") if len(p.strip()) > 80} for t in texts.values()]
    assert not paras[0] & paras[1]  # no shared paragraph: the sites' texts really differ


def test_missing_offline_text_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step, "LICENSES", tmp_path / "nowhere")
    with pytest.raises(UserInputError) as exc:
        step.make_corpus("north", tmp_path / "north.txt")
    assert "site north" in exc.value.message and "base-files" in (exc.value.hint or "")
    assert not (tmp_path / "north.txt").exists()


def test_llama_cpp_perplexity_matches_adapt_and_drops_with_the_adapter(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step, "TRAIN_STEPS", 25)
    monkeypatch.setattr(step, "TRAIN_MINUTES", None)  # steps only: the same result every run
    monkeypatch.setattr(step, "EVAL_TOKENS", 32 * step.WINDOW)  # adapt's first 32 windows
    run_pass("export-gguf", {"outtype": "f32"}, tiny_model, tmp_path / "gguf")
    base_gguf = tmp_path / "gguf" / "model.gguf"
    corpus = step.make_corpus("north", tmp_path / "north.txt")
    ev = step.train_site_adapter(tiny_model, corpus, tmp_path / "adapter")
    ids = step.heldout_ids(tiny_model, corpus)
    ids = ids[: len(ids) // step.WINDOW * step.WINDOW]  # whole windows, as adapt scores them
    assert len(ids) >= 4 * step.WINDOW

    base = step.gguf_perplexity(base_gguf, None, ids)
    adapted = step.gguf_perplexity(base_gguf, tmp_path / "adapter" / "adapter.gguf", ids)
    assert base == pytest.approx(ev["site_perplexity_base"], rel=0.01)
    assert adapted == pytest.approx(ev["site_perplexity_adapted"], rel=0.01)
    assert adapted < 0.95 * base
