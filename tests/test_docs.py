"""Documentation that cannot drift: every pass and every CLI command is in the README."""

from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join(README.splitlines()[:10])
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize(
    "name", sorted(__import__("slmops.optimize.passes.base", fromlist=["x"]).registry())
)
def test_every_pass_is_documented(name: str) -> None:
    assert f"`{name}`" in README, f"pass {name} is missing from the README's pass table"


def test_every_command_is_documented() -> None:
    from slmops.cli.main import app

    names = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    for name in names:
        assert f"slmops {name}" in README, f"command `slmops {name}` is not in the README"
