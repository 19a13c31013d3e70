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


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "examples" / "fleet").glob("*.yaml")), ids=str
)
def test_fleet_examples_are_valid(path: Path) -> None:
    from slmops.core.config import read_structured_file
    from slmops.server.blueprints.document import Blueprint
    from slmops.server.feedback.rules import FeedbackRules

    kind = read_structured_file(path)["kind"]
    model = {"Blueprint": Blueprint, "FeedbackRules": FeedbackRules}[kind]
    model.from_file(path)  # unknown keys or bad values fail here, naming file and key
