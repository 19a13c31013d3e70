from pathlib import Path

import pytest

from slmops.core.config import StrictModel
from slmops.core.errors import ConfigError


class Sample(StrictModel):
    name: str
    count: int = 1


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ncuont: 3\n")
    with pytest.raises(ConfigError) as exc:
        Sample.from_file(f)
    assert "cuont" in exc.value.message
    assert str(f) == exc.value.where
    assert exc.value.exit_code == 2


def test_bad_value_and_missing_key(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text('{"count": "many"}')
    with pytest.raises(ConfigError) as exc:
        Sample.from_file(f)
    text = exc.value.render()
    assert "name" in text and "count" in text


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Sample.from_file(f)
    with pytest.raises(ConfigError, match="file not found"):
        Sample.from_file(tmp_path / "nope.yaml")


def test_valid_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text("name: edge\ncount: 4\n")
    assert Sample.from_file(f) == Sample(name="edge", count=4)
