import json
import shutil
from pathlib import Path

import pytest

from slmops.core.errors import ModelFormatError
from slmops.model.handle import ModelFormat, hf_parameter_count, open_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_open_valid_model(tiny_model: Path) -> None:
    m = open_model(tiny_model)
    assert m.format is ModelFormat.HF
    assert m.architecture == "llama"
    assert hf_parameter_count(tiny_model) > 100_000
    assert m.digest.startswith("sha256:")


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not a model directory"):
        open_model(tmp_path)
    with pytest.raises(ModelFormatError, match="no such model directory"):
        open_model(tmp_path / "missing")


def test_unsupported_architecture(tiny_model: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="unsupported architecture 'BertModel'") as exc:
        open_model(d)
    assert "LlamaForCausalLM" in (exc.value.hint or "")


def test_missing_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="missing tokenizer"):
        open_model(d)


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_safetensors(tiny_model: Path, tmp_path: Path, damage: str) -> None:
    d = _copy(tiny_model, tmp_path / "m")
    w = next(d.glob("*.safetensors"))
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(ModelFormatError, match="corrupt safetensors"):
        open_model(d)


def test_broken_config_json(tiny_model: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        open_model(d)
