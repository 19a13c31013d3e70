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
from slmops.core.config import read_structured_file
from slmops.core.errors import ConfigError, SlmopsError, UserInputError
from slmops.server.blueprints.document import Blueprint
from slmops.server.feedback.rules import FeedbackRules

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


def _kind_of(file: Path) -> str:
    """The document's ``kind`` (Blueprint or FeedbackRules), so one command applies both."""
    data = read_structured_file(file)
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in ("Blueprint", "FeedbackRules"):
        raise ConfigError(
            f"kind {kind!r} is not something slmops applies",
            where=f"{file}: kind",
            hint="use kind: Blueprint or kind: FeedbackRules",
        )
    return str(kind)


def apply_command(
    file: Annotated[Path, typer.Option("-f", "--file", help="Blueprint YAML or JSON file")],
    server: ServerOpt,
    token: TokenOpt,
    as_json: JsonOpt = False,
) -> None:
    """Apply a Blueprint or FeedbackRules file: create or update it; unchanged files change
    nothing."""

    def go() -> dict[str, Any]:
        kind = _kind_of(file)
        if kind == "FeedbackRules":
            rules = FeedbackRules.from_file(file)
            doc = rules.model_dump(mode="json", exclude_none=True)
            path = f"/api/v1/feedback-rules/{rules.metadata.name}"
            return {"kind": kind} | call("PUT", server, path, token, doc)
        bp = Blueprint.from_file(file)
        doc = bp.model_dump(mode="json", exclude_none=True)
        path = f"/api/v1/blueprints/{bp.metadata.name}"
        return {"kind": "Blueprint"} | call("PUT", server, path, token, doc)

    result = run_command(as_json, go)
    if as_json:
        emit_json(result)
        return
    state = "configured" if result["changed"] else "unchanged"
    if result["kind"] == "FeedbackRules":
        rules = result["document"]["spec"]["rules"]
        out_console.print(
            f"feedbackrules/{result['name']} {state} (generation {result['generation']}, "
            f"{len(rules)} rule(s))"
        )
        return
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


def _listing(path: str, server: str, token: str, as_json: bool) -> list[dict[str, Any]]:
    result = run_command(as_json, lambda: call("GET", server, path, token))
    if as_json:
        emit_json(result)
        return []
    data: list[dict[str, Any]] = result["data"] if isinstance(result, dict) else result
    return data


@get_app.command("alerts")
def get_alerts_command(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    """List drift and regression alerts, newest first."""
    for a in _listing("/api/v1/alerts", server, token, as_json):
        ack = "acknowledged" if a["acknowledged"] else "open"
        out_console.print(
            f"#{a['id']}\t{a['kind']}\t{a['model']}:{a['version']} {a['profile']}\t"
            f"{a['statistic']}={a['value']:.3g} (threshold {a['threshold']:g})\t{ack}"
        )


@get_app.command("jobs")
def get_jobs_command(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    """List improvement jobs (queued by feedback rules, run by `slmops improve-worker`)."""
    for j in _listing("/api/v1/jobs", server, token, as_json):
        extra = f" -> {j['new_version']}" if j["new_version"] else ""
        rollout = f", rollout {j['rollout_id']}" if j["rollout_id"] else ""
        out_console.print(
            f"job {j['id']}\t{j['status']}\t{j['direction']} for {j['profile']}\t"
            f"{j['model']}:{j['version']}{extra} (alert {j['alert_id']}{rollout})"
        )


@get_app.command("rules")
def get_rules_command(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    """List applied feedback rule sets."""
    for r in _listing("/api/v1/feedback-rules", server, token, as_json):
        names = ", ".join(x["name"] for x in r["document"]["spec"]["rules"])
        out_console.print(f"{r['name']}\tgeneration {r['generation']}\trules: {names}")
