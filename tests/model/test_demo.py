import time
from pathlib import Path

from slmops.core.digest import sha256_file
from slmops.model.demo import train_demo_model
from slmops.model.demo_corpus import build_corpus


def test_corpus_is_offline_deterministic_and_split() -> None:
    a = build_corpus(limit_chars=50_000)
    b = build_corpus(limit_chars=50_000)
    assert a.train == b.train and a.heldout == b.heldout
    assert len(a.train) > 40_000 and len(a.heldout) > 1_000
    assert not set(a.heldout_docs) & set(a.train_docs), "held-out docstrings must not be trained on"
    assert a.calibration_docs and set(a.calibration_docs) <= set(a.train_docs)


def test_demo_model_is_deterministic_and_cached(tmp_path: Path, tiny_model: Path) -> None:
    cache = tmp_path / "cache"
    r1 = train_demo_model(tmp_path / "a", size="tiny", steps=5, seed=7, cache_dir=cache)
    assert not r1.cached
    t0 = time.perf_counter()
    r2 = train_demo_model(tmp_path / "a", size="tiny", steps=5, seed=7, cache_dir=cache)
    assert r2.cached and time.perf_counter() - t0 < 1.0
    # A fresh cache trains again and must give bit-identical weights for the same seed.
    r3 = train_demo_model(
        tmp_path / "b", size="tiny", steps=5, seed=7, cache_dir=tmp_path / "cache2"
    )
    assert not r3.cached
    w = "model.safetensors"
    assert sha256_file(r1.path / w) == sha256_file(r3.path / w)
    r4 = train_demo_model(tmp_path / "c", size="tiny", steps=5, seed=8, cache_dir=cache)
    assert sha256_file(r4.path / w) != sha256_file(r1.path / w)
    for f in ("config.json", "tokenizer.json", "heldout.txt", "calibration.txt"):
        assert (r1.path / f).exists()
    assert r1.heldout_perplexity > 1
