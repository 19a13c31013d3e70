"""slmops adapt: a LoRA adapter trains on a site's text, beats the base on the site's held-out
split, exports to GGUF, and llama.cpp applies it to the base GGUF as PEFT does in torch."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli, run_pass
from slmops.adapt.data import load_site_data
from slmops.adapt.export import gguf_logits
from slmops.adapt.run import adapt
from slmops.adapt.train import TrainOptions
from slmops.core.errors import ConfigError
from slmops.model.card import read_card
from slmops.model.handle import open_model

ITEMS = ["espresso", "flat white", "croissant", "bagel", "green tea", "muffin", "latte", "scone"]


def site_text(path: Path, n: int = 60) -> Path:
    """A small shop's own vocabulary: menu lines the base model has never seen."""
    rnd = random.Random(0)
    paras = []
    for _ in range(n):
        a, b = rnd.sample(ITEMS, 2)
        paras.append(
            f"Store one menu: the {a} costs {rnd.randint(2, 6)} dollars and the {b} costs "
            f"{rnd.randint(2, 6)} dollars. Ask for the {a} with oat milk."
        )
    path.write_text("\n\n".join(paras))
    return path


def test_adapter_improves_site_perplexity_and_runs_in_llama_cpp(
    tiny_model: Path, tmp_path: Path
) -> None:
    run_pass("export-gguf", {"outtype": "f32"}, tiny_model, tmp_path / "gguf")
    base_gguf = tmp_path / "gguf" / "model.gguf"
    out = tmp_path / "adapter"
    opts = TrainOptions(steps=40, minutes=None, seqlen=64, threads=1, lr=3e-3)
    res = adapt(tiny_model, site_text(tmp_path / "site.txt"), out, opts, base_gguf=base_gguf)

    ev = res.evaluation
    assert ev["site_perplexity_adapted"] < 0.9 * ev["site_perplexity_base"]
    assert ev["general_kld_to_base"] > 0 and ev["general_text"] == "heldout.txt"
    assert ev["data"]["heldout_units"] == 6 and ev["data"]["train_units"] == 54
    assert ev["llama_cpp"]["loads"] and ev["llama_cpp"]["changes_output"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "adapter.gguf"} <= names
    assert {"evaluation.json", "slmops-card.json"} <= names
    card = read_card(out)
    assert card is not None and card.kinds() == ["adapt"] and card.format == "lora-adapter"
    assert card.chain[-1].input_digest == open_model(tiny_model).digest
    assert card.chain[-1].report["site_perplexity_adapted"] == ev["site_perplexity_adapted"]
    assert json.loads((out / "evaluation.json").read_text())["llama_cpp"]["changes_output"]

    # llama.cpp with the GGUF LoRA computes what PEFT computes in torch (and not the base).
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from slmops.model.hf import load_causal_lm

    ids = AutoTokenizer.from_pretrained(tiny_model)("Store one menu: the latte costs")["input_ids"]
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_model), out).eval()
    with torch.no_grad():
        want = peft(input_ids=torch.tensor([ids])).logits[0].numpy()
    adapted = gguf_logits(base_gguf, ids, out / "adapter.gguf")
    plain = gguf_logits(base_gguf, ids, None)
    assert np.abs(adapted - plain).max() > 0.05
    assert np.abs(adapted - want).max() < 0.1 * np.abs(plain - want).max()


def test_chat_examples_use_the_chat_template(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"price of item {i}?"},
                {"role": "assistant", "content": f"{i} dollars at store one"},
            ]
        }
        for i in range(30)
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    site = load_site_data(f, tok)
    assert site.kind == "chat" and site.chat_template
    assert len(site.heldout) == 3 and len(site.train) == 27
    assert site.train[0] == tok.apply_chat_template(rows[0]["messages"], tokenize=False)

    f.write_text(json.dumps(rows[0]) + "\n" + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ConfigError, match="messages") as exc:
        load_site_data(f, tok)
    assert exc.value.where == f"{f}:2"


def test_bad_input_exits_2_with_what_where_fix(tiny_model: Path, tmp_path: Path) -> None:
    site = site_text(tmp_path / "site.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    cases = [
        ((str(tiny_model), "--data", str(tmp_path / "missing.txt")), "data file not found"),
        ((str(tiny_model), "--data", str(empty)), "data file is empty"),
        ((str(not_a_model), "--data", str(site)), "must be a Hugging Face model folder"),
        ((str(tiny_model), "--data", str(site), "--steps", "0"), "--steps must be positive"),
    ]
    for args, message in cases:
        proc = run_cli("adapt", *args, "--out", str(tmp_path / "out"), "--json")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        err = json.loads(proc.stdout)
        assert message in err["message"] and err["where"] and err["hint"], err
    assert not (tmp_path / "out").exists()  # nothing half-written
