"""`slmops apply -f` and `slmops get blueprints`: the operator's side of blueprints.

The file is validated locally first (``Blueprint.from_file``), so a typo is reported with the
file and key before anything is sent; the server validates again, since other clients exist.
API errors arrive as the control plane's envelope and are shown with its ``where`` and hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from slmops.cli._output import emit_json, out_console, run_command
from slmops.core.errors import SlmopsError, UserInputError
from slmops.server.blueprint import Blueprint

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
ServerOpt = Annotated[
    str, typer.Option("--server", envvar="SLMOPS_SERVER", help="control plane URL")
]
TokenOpt = Annotated[
    str, typer.Option("--token", envvar="SLMOPS_TOKEN", help="operator API token (slmo_...)")
]

get_app = typer.Typer(help="List control-plane resources.", no_args_is_help=True)


def call(method: str, server: str, path: str, token: str, body: Any = None) -> dict[str, Any]:
    """One API call; the error envelope becomes a SlmopsError (exit 2 for 4xx, else 1)."""
    url = server.rstrip("/") + path
    try:
        r = httpx.request(
            method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
    except httpx.HTTPError as exc:
        raise SlmopsError(
            f"cannot reach the control plane: {exc}", where=url, hint="check --server"
        ) from None
    try:
        doc: dict[str, Any] = r.json()
    except ValueError:
        doc = {}
    if r.status_code >= 400:
        err = doc.get("error") or {}
        cls = UserInputError if r.status_code < 500 else SlmopsError
        raise cls(
            f"HTTP {r.status_code}: {err.get('message') or r.text[:200]}",
            where=err.get("where") or url,
            hint=err.get("hint"),
        )
    return doc


def apply_command(
    file: Annotated[Path, typer.Option("-f", "--file", help="Blueprint YAML or JSON file")],
    server: ServerOpt,
    token: TokenOpt,
    as_json: JsonOpt = False,
) -> None:
    """Apply a blueprint: create or update it; unchanged files change nothing."""

    def go() -> dict[str, Any]:
        bp = Blueprint.from_file(file)
        doc = bp.model_dump(mode="json", exclude_none=True)
        return call("PUT", server, f"/api/v1/blueprints/{bp.metadata.name}", token, doc)

    result = run_command(as_json, go)
    if as_json:
        emit_json(result)
        return
    state = "configured" if result["changed"] else "unchanged"
    out_console.print(
        f"blueprint/{result['name']} {state} (generation {result['generation']}, "
        f"{result['devices']} device(s))"
    )
    if result.get("rollout"):
        rid = result["rollout"]
        out_console.print(
            f"rollout/{rid} created: follow it with [bold]slmops rollout get {rid}[/] or "
            f"[bold]slmops rollout wait {rid}[/]"
        )


@get_app.command("blueprints")
def get_blueprints_command(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    """List the applied blueprints."""
    result = run_command(as_json, lambda: call("GET", server, "/api/v1/blueprints", token))
    if as_json:
        emit_json(result)
        return
    for bp in result["data"]:
        model = bp["document"]["spec"]["model"]
        ref = model.get("version") or f"channel {model.get('channel')}"
        selector = ",".join(f"{k}={v}" for k, v in bp["document"]["spec"]["selector"].items())
        stable = bp.get("stable_version") or "none yet"
        out_console.print(
            f"{bp['name']}\tgeneration {bp['generation']}\t{model['name']} {ref} "
            f"(stable {stable})\tselector {selector or '(all devices)'}"
        )
