from pathlib import Path

import pytest

from slmops.core.errors import ConfigError, UnknownPassError
from slmops.optimize.passes.base import registry
from slmops.optimize.recipe import load_recipe


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(text)
    return f


def test_default_recipe_is_valid_and_covers_every_pass() -> None:
    from slmops.cli.optimize import default_recipe_path

    recipe = load_recipe(default_recipe_path())
    used = {s.name for steps in recipe.variants.values() for s in steps}
    # distill trains for minutes, so the default recipe leaves it to prune-distill.yaml
    assert used == set(registry()) - {"distill"}, "edge-default must exercise every other pass"
    examples = Path(__file__).parents[2] / "examples" / "recipes"
    for path in sorted(examples.glob("*.yaml")):
        load_recipe(path)  # every example recipe is valid
    distilled = load_recipe(examples / "prune-distill.yaml")
    assert "distill" in {s.name for steps in distilled.variants.values() for s in steps}
    example = Path(__file__).parents[2] / "examples" / "recipes" / "edge-default.yaml"
    assert example.read_text() == default_recipe_path().read_text()


def test_unknown_pass_suggests_the_close_one(tmp_path: Path) -> None:
    f = _write(tmp_path, "variants:\n  a:\n    - export-guff: {}\n")
    with pytest.raises(UnknownPassError) as exc:
        load_recipe(f)
    assert "export-gguf" in (exc.value.hint or "")
    assert "variants.a[0]" in (exc.value.where or "")


def test_unknown_option_and_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'outtpye'"):
        load_recipe(_write(tmp_path, "variants:\n  a:\n    - export-gguf: {outtpye: f16}\n"))
    with pytest.raises(ConfigError, match="outtype"):
        load_recipe(_write(tmp_path, "variants:\n  a:\n    - export-gguf: {outtype: f8}\n"))


def test_formats_must_connect(tmp_path: Path) -> None:
    f = _write(tmp_path, "variants:\n  a:\n    - quantize-gguf: {type: Q4_0}\n")
    with pytest.raises(ConfigError, match="takes a gguf model but the chain has a hf model"):
        load_recipe(f)


def test_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one pass name"):
        load_recipe(_write(tmp_path, "variants:\n  a:\n    - {export-gguf: {}, export-onnx: {}}\n"))
    with pytest.raises(ConfigError, match="variant name"):
        load_recipe(_write(tmp_path, "variants:\n  'Bad Name':\n    - export-gguf\n"))
    with pytest.raises(ConfigError, match="unknown key 'variant'"):
        load_recipe(_write(tmp_path, "variant:\n  a:\n    - export-gguf\n"))


def test_bare_step_uses_defaults(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, "variants:\n  a:\n    - export-gguf\n    - quantize-gguf\n"))
    assert [s.options.get("type") for s in r.variants["a"]] == [None, "Q4_K_M"]
