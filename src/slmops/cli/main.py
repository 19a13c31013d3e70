"""The `slmops` command.

The full Typer app (every command module, and what they import) is built on first use.
``slmops agent ...`` skips it and runs the agent command alone: the agent is a long-running
daemon on small devices and pays for every imported module in resident memory, while
``slmops --help`` still builds the full app and lists every command, the agent included.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Annotated

import typer

from slmops import __version__


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slmops {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """slmops: the small-language-model operations loop, from weights to fleet."""


@cache
def build_app() -> typer.Typer:
    from slmops.cli import (
        adapt,
        agent,
        bundle,
        demo,
        devices,
        evaluate,
        fleet,
        fleet_sim,
        importer,
        improve,
        model,
        optimize,
        rollout,
        server,
    )

    app = typer.Typer(
        name="slmops",
        help="Operate small language models at the edge: optimize, evaluate, ship, watch, improve.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.callback()(_root)
    app.command("passes")(optimize.passes_command)
    app.command("optimize")(optimize.optimize_command)
    app.command("import")(importer.import_command)
    app.command("profiles")(evaluate.profiles_command)
    app.command("evaluate")(evaluate.evaluate_command)
    app.command("gate")(evaluate.gate_command)
    app.command("bundle")(bundle.bundle_command)
    app.command("bundle-adapter")(bundle.bundle_adapter_command)
    app.command("inspect")(bundle.inspect_command)
    app.command("sign")(bundle.sign_command)
    app.command("verify")(bundle.verify_command)
    app.command("push")(bundle.push_command)
    app.command("pull")(bundle.pull_command)
    app.add_typer(bundle.keys_app, name="keys")
    app.add_typer(server.app, name="server")
    app.command("apply")(fleet.apply_command)
    app.add_typer(fleet.get_app, name="get")
    fleet.get_app.command("audit")(devices.get_audit_command)
    app.add_typer(devices.app, name="devices")
    app.add_typer(rollout.app, name="rollout")
    app.add_typer(fleet_sim.app, name="fleet")
    app.command("improve")(improve.improve_command)
    app.command("improve-worker")(improve.improve_worker_command)
    app.command("agent")(agent.agent_command)
    app.command("demo")(demo.demo_command)
    app.add_typer(model.app, name="model")
    app.command("adapt")(adapt.adapt_command)
    return app


def __getattr__(name: str) -> typer.Typer:
    # `from slmops.cli.main import app` (tests, docs generation) still works.
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    # Typer/click report usage errors (unknown option, missing argument) with exit code 2.
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        from slmops.cli.agent import main as agent_main

        del sys.argv[1]
        agent_main(prog_name="slmops agent")
        return
    build_app()()


if __name__ == "__main__":
    main()
