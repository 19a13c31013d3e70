"""The distill pass: KLD to the teacher goes down, teacher logits are computed once, lineage."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_pass
from slmops.core.errors import ConfigError
from slmops.model.card import read_card
from slmops.optimize.engine import run_recipe
from slmops.optimize.recipe import load_recipe

# A few dozen steps on one thread: seconds on the tiny model, even on a busy shared box.
FAST = {"steps": 40, "lr": 1e-4, "seqlen": 64, "threads": 1}


@pytest.fixture(scope="module")
def pruned(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "pruned"
    run_pass("prune-structured", {"target": "ffn", "ratio": 0.75}, tiny_model, out)
    return out


def test_distill_lowers_kld_and_caches_teacher_logits(
    tiny_model: Path, pruned: Path, tmp_path: Path
) -> None:
    opts = {**FAST, "teacher": str(tiny_model), "cache_dir": str(tmp_path / "teacher")}
    first = run_pass("distill", opts, pruned, tmp_path / "a").report
    assert first["teacher_logits"] == "computed" and first["teacher_forward_windows"] > 0
    assert first["steps"] == 40 and first["stopped_by"] == "steps"
    assert 0 < first["kld_after"] < first["kld_before"]
    assert first["heldout_windows"] >= 1 and first["train_windows"] == 128
    cache = Path(first["teacher_cache"])
    stamp = cache.stat().st_ino  # read, not rewritten: an atomic rewrite is a new inode

    second = run_pass("distill", opts, pruned, tmp_path / "b").report
    assert second["teacher_logits"] == "cache" and second["teacher_forward_windows"] == 0
    assert cache.stat().st_ino == stamp and list(cache.parent.iterdir()) == [cache]
    # Same targets, same seed: the same training and the same result.
    assert second["kld_before"] == first["kld_before"]
    assert second["kld_after"] == pytest.approx(first["kld_after"], rel=1e-3)


def test_recipe_prune_then_distill_records_before_after(tiny_model: Path, tmp_path: Path) -> None:
    """In a recipe the teacher is the model the chain started from (the card's origin)."""
    recipe = tmp_path / "recipe.yaml"
    steps = {**FAST, "steps": 10, "cache_dir": str(tmp_path / "teacher")}
    recipe.write_text(
        "name: t\nvariants:\n  ffn-distilled:\n"
        "    - prune-structured: {target: ffn, ratio: 0.75}\n"
        f"    - distill: {json.dumps(steps)}\n"
    )
    run_recipe(tiny_model, load_recipe(recipe), tmp_path / "out", cache_dir=tmp_path / "cache")
    card = read_card(tmp_path / "out" / "ffn-distilled")
    assert card is not None and card.kinds() == ["prune-structured", "distill"]
    rep = card.chain[-1].report
    assert rep["teacher"] == str(tiny_model.resolve())
    assert rep["kld_after"] < rep["kld_before"]
    assert card.structure is not None and card.structure["target"] == "ffn"  # kept from prune


def test_distill_needs_a_teacher_with_the_same_tokenizer(
    tiny_model: Path, pruned: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="no teacher") as exc:
        run_pass("distill", FAST, pruned, tmp_path / "a")  # no card, no teacher option
    assert exc.value.hint and "teacher" in exc.value.hint

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz-new-token"] = len(tok["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"tokenizer\.json differs"):
        run_pass("distill", {**FAST, "teacher": str(other)}, pruned, tmp_path / "b")

    with pytest.raises(ConfigError, match="teacher is not a usable model"):
        run_pass("distill", {**FAST, "teacher": str(tmp_path)}, pruned, tmp_path / "c")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "examples" / "recipes").glob("*.yaml")), ids=str
)
def test_example_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)  # unknown passes, options or bad values fail here
    assert recipe.variants


def test_teacher_cache_keeps_to_its_size_by_least_recent_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from slmops.core.errors import UserInputError
    from slmops.optimize.passes import _distill_targets as dt

    entries = []
    for i in range(4):
        f = tmp_path / f"e{i}.safetensors"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))  # e0 is the least recently used
        entries.append(f)
    os.utime(entries[0], (2000, 2000))  # ... until it is read again
    removed = dt.prune_cache(tmp_path, keep=entries[3], max_bytes=2500)
    assert removed == [entries[1], entries[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.safetensors", "e3.safetensors"]
    # the entry in use stays even when it alone is over the limit
    assert dt.prune_cache(tmp_path, keep=entries[3], max_bytes=0) == [entries[0]]
    assert entries[3].exists()
    monkeypatch.setenv("SLMOPS_DISTILL_CACHE_MAX_GB", "0.5")
    assert dt.cache_max_bytes() == 1 << 29
    monkeypatch.setenv("SLMOPS_DISTILL_CACHE_MAX_GB", "lots")
    with pytest.raises(UserInputError, match="SLMOPS_DISTILL_CACHE_MAX_GB"):
        dt.cache_max_bytes()


def test_windows_start_with_bos_like_evaluation_windows(tiny_model: Path, tmp_path: Path) -> None:
    """Training and held-out windows begin with the tokenizer's BOS (when it has one) and keep
    their length; the rest is consecutive text, and the two sets share no token position."""
    from transformers import AutoTokenizer

    from slmops.optimize.passes._distill_targets import split_windows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = (tiny_model / "heldout.txt").read_text() if (tiny_model / "heldout.txt").exists() else ""
    text = (text + " ") * 4 if text else "the quick brown fox jumps over the lazy dog. " * 400
    train, held = split_windows(
        tiny_model,
        text,
        windows=4,
        eval_windows=2,
        seqlen=32,
        heldout_fraction=0.2,
        seed=0,
        where=tmp_path,
    )
    assert train.shape == (4, 32) and held.shape[1] == 32 and held.shape[0] >= 1
    if tok.bos_token_id is None:
        pytest.fail("the tiny model's tokenizer has no BOS: this test needs one to mean anything")
    assert (train[:, 0] == tok.bos_token_id).all() and (held[:, 0] == tok.bos_token_id).all()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut = int(len(ids) * 0.8)
    assert held[0, 1:].tolist() == ids[cut : cut + 31]
