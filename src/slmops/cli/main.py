"""The `slmops` command."""

from __future__ import annotations

from typing import Annotated

import typer

from slmops import __version__
from slmops.cli import agent, bundle, demo, evaluate, fleet, model, optimize, rollout, server

app = typer.Typer(
    name="slmops",
    help="Operate small language models at the edge: optimize, evaluate, ship, watch, improve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slmops {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """slmops: the small-language-model operations loop, from weights to fleet."""


app.command("passes")(optimize.passes_command)
app.command("optimize")(optimize.optimize_command)
app.command("profiles")(evaluate.profiles_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("gate")(evaluate.gate_command)
app.command("bundle")(bundle.bundle_command)
app.command("inspect")(bundle.inspect_command)
app.command("sign")(bundle.sign_command)
app.command("verify")(bundle.verify_command)
app.command("push")(bundle.push_command)
app.command("pull")(bundle.pull_command)
app.add_typer(bundle.keys_app, name="keys")
app.add_typer(server.app, name="server")
app.command("apply")(fleet.apply_command)
app.add_typer(fleet.get_app, name="get")
app.add_typer(rollout.app, name="rollout")
app.command("agent")(agent.agent_command)
app.command("demo")(demo.demo_command)
app.add_typer(model.app, name="model")


def main() -> None:
    # Typer/click report usage errors (unknown option, missing argument) with exit code 2.
    app()


if __name__ == "__main__":
    main()
