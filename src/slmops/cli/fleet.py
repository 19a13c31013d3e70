"""`slmops apply -f` and `slmops get blueprints`: the operator's side of blueprints.

The file is validated locally first (``Blueprint.from_file``), so a typo is reported with the
file and key before anything is sent; the server validates again, since other clients exist.
API errors arrive as the control plane's envelope and are shown with its ``where`` and hint.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from slmops.cli._output import console, emit_json, out_console, run_command
from slmops.core.config import read_structured_file
from slmops.core.errors import CheckFailedError, ConfigError, SlmopsError, UserInputError
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


def call(
    method: str,
    server: str,
    path: str,
    token: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One API call; the error envelope becomes a SlmopsError (exit 2 for 4xx, else 1)."""
    url = server.rstrip("/") + path
    try:
        r = httpx.request(
            method,
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}"} | (headers or {}),
            timeout=timeout,
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


SERVER_WAIT = 20  # seconds the server may hold the answer (under the 30 s request timeout)


def settled(
    server: str, token: str, name: str, generation: int, *, timeout: float, quiet: bool
) -> dict[str, Any]:
    """Poll the blueprint until ``generation`` is settled (its rollout created, its devices
    re-governed): an apply over a big fleet answers before that (202). A settle that failed
    stops the wait with the server's reason (exit 1)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    try:
        with contextlib.ExitStack() as stack:
            if not quiet:
                stack.enter_context(
                    console.status(f"blueprint/{name}: settling generation {generation}...")
                )
            while True:
                doc = call("GET", server, f"/api/v1/blueprints/{name}", token)
                if doc.get("settled_generation", generation) >= generation:
                    return doc
                if doc.get("settle_error"):
                    raise CheckFailedError(
                        f"blueprint {name} generation {generation} was stored, but settling it "
                        f"failed: {doc['settle_error']}",
                        where=f"blueprint {name}",
                        hint="the control plane retries it; see its log, or apply a corrected spec",
                    )
                if time.monotonic() > deadline:
                    raise CheckFailedError(
                        f"blueprint {name} generation {generation} not settled after {timeout:g} s",
                        where=f"blueprint {name}",
                        hint="it goes on in the server: follow it with slmops get blueprints",
                    )
                time.sleep(delay)
                delay = min(delay * 1.5, 2.0)
    except KeyboardInterrupt:
        raise SlmopsError(
            f"stopped waiting: blueprint {name} generation {generation} is stored and goes on "
            "settling in the server",
            where=f"blueprint {name}",
            hint="follow it with slmops get blueprints",
        ) from None


def apply_command(
    file: Annotated[Path, typer.Option("-f", "--file", help="Blueprint YAML or JSON file")],
    server: ServerOpt,
    token: TokenOpt,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="wait until the apply is settled (its rollout created, devices re-governed)",
        ),
    ] = True,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits at most")] = 1800.0,
    as_json: JsonOpt = False,
) -> None:
    """Apply a Blueprint or FeedbackRules file: create or update it; unchanged files change
    nothing. Over a big fleet the server answers before the apply is settled; the command
    then waits for it (unless --no-wait) and names the rollout it created."""

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
        prefer = {"Prefer": f"respond-async, wait={SERVER_WAIT if wait else 0}"}
        done = call("PUT", server, path, token, doc, headers=prefer, timeout=SERVER_WAIT + 60)
        generation = done["generation"]
        if wait and done.get("settled_generation", generation) < generation:
            later = settled(server, token, done["name"], generation, timeout=timeout, quiet=as_json)
            rollout = (
                later["settled_rollout"] if later["settled_generation"] == generation else None
            )
            done = later | {"changed": done["changed"], "devices": None, "rollout": rollout}
        return {"kind": "Blueprint"} | done

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
    devices = "" if result["devices"] is None else f", {result['devices']} device(s)"
    out_console.print(
        f"blueprint/{result['name']} {state} (generation {result['generation']}{devices})"
    )
    if result.get("settled_generation", result["generation"]) < result["generation"]:
        out_console.print(
            f"settling in the server: follow it with [bold]slmops get blueprints[/] "
            f"(settled when its generation is {result['generation']})"
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
        if bp.get("settle_error"):
            stable += f"; generation {bp['generation']} failed to settle: {bp['settle_error']}"
        elif bp.get("settled_generation", bp["generation"]) < bp["generation"]:
            stable += f"; settling generation {bp['generation']}"
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
