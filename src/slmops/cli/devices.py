"""`slmops devices list|delete|revoke|rotate|approve|reject` and `slmops get audit`.

Thin commands over the operator API (``/api/v1/devices``, ``/api/v1/audit``), with the same
``--server``/``--token`` options as ``slmops get``; API errors arrive as the control plane's
envelope and exit 2 (bad input, refused) or 1. See ``server/identity.py`` for what each does.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

from slmops.cli._output import emit_json, out_console, run_command
from slmops.cli.fleet import JsonOpt, ServerOpt, TokenOpt, call

app = typer.Typer(
    help="Device identity: list, approve or reject re-enrollments, revoke, rotate, delete.",
    no_args_is_help=True,
)

DeviceArg = Annotated[str, typer.Argument(help="the device id")]
RequestOpt = Annotated[
    str | None,
    typer.Option("--request", help="the request id you looked at (refused if another is pending)"),
]


def _done(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    extra = f" (request {result['request_id']})" if result.get("request_id") else ""
    if result.get("rollouts"):
        extra += f"; taken out of rollout(s) {', '.join(result['rollouts'])}"
    state = result.get("status") or "gone"
    out_console.print(f"device/{result['device_id']} {result['action']}: {state}{extra}")


def adapter_of(active: dict[str, Any] | None) -> str | None:
    """``name:version`` of the LoRA adapter the device reported on top of its model, or None
    (the same rule as the dashboard's Adapters panel, server/dashboard/adapters_panel.py)."""
    adapter = (active or {}).get("adapter")
    if not isinstance(adapter, dict) or not adapter.get("name"):
        return None
    return f"{adapter['name']}:{adapter.get('version') or '?'}"


@app.command("list")
def list_command(
    server: ServerOpt,
    token: TokenOpt,
    selector: Annotated[str | None, typer.Option("--selector", "-l", help="k=v,k2!=v2")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List devices with their identity status, the LoRA adapter they last reported running
    (``name:version``; also the ``adapter`` key of each item in --json) and any re-enrollment
    waiting for approval."""
    query = str(httpx.QueryParams({"selector": selector})) if selector else ""
    path = "/api/v1/devices" + (f"?{query}" if query else "")
    result = run_command(as_json, lambda: call("GET", server, path, token))
    for d in result["data"]:
        d["adapter"] = adapter_of(d.get("active"))
    if as_json:
        emit_json(result)
        return
    for d in result["data"]:
        pending = d.get("pending_request")
        wait = f"\tPENDING {pending['id']} ({pending['reason']})" if pending else ""
        seen = d.get("last_seen") or "never"
        adapter = f"adapter {d['adapter'] or 'none'}"
        out_console.print(f"{d['device_id']}\t{d['status']}\t{adapter}\tlast seen {seen}{wait}")


def _post(action: str, device_id: str, server: str, token: str, body: Any, as_json: bool) -> None:
    path = f"/api/v1/devices/{device_id}/{action}"
    _done(run_command(as_json, lambda: call("POST", server, path, token, body)), as_json)


@app.command("approve")
def approve_command(
    device_id: DeviceArg,
    server: ServerOpt,
    token: TokenOpt,
    request: RequestOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve the device's pending re-enrollment (its new credential replaces the old)."""
    _post("approve", device_id, server, token, {"request_id": request}, as_json)


@app.command("reject")
def reject_command(
    device_id: DeviceArg,
    server: ServerOpt,
    token: TokenOpt,
    request: RequestOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reject the device's pending re-enrollment (the enrolled device keeps working)."""
    _post("reject", device_id, server, token, {"request_id": request}, as_json)


@app.command("revoke")
def revoke_command(
    device_id: DeviceArg,
    server: ServerOpt,
    token: TokenOpt,
    reason: Annotated[
        str | None, typer.Option("--reason", help="why (kept in the audit log)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke the device's credential now; the record stays, it returns only by approval."""
    _post("revoke", device_id, server, token, {"reason": reason}, as_json)


@app.command("rotate")
def rotate_command(
    device_id: DeviceArg, server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False
) -> None:
    """Force a new credential: the device must re-enroll, and you approve it."""
    _post("rotate", device_id, server, token, None, as_json)


@app.command("delete")
def delete_command(
    device_id: DeviceArg, server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False
) -> None:
    """Decommission: credential dead, record removed, out of every unfinished rollout."""
    path = f"/api/v1/devices/{device_id}"
    _done(run_command(as_json, lambda: call("DELETE", server, path, token)), as_json)


def get_audit_command(
    server: ServerOpt,
    token: TokenOpt,
    target: Annotated[str | None, typer.Option("--target", help="e.g. device/edge-1")] = None,
    action: Annotated[str | None, typer.Option("--action", help="e.g. device.revoke")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Show the identity audit log, newest first (operators and admins)."""
    params = {"limit": limit, "target": target, "action": action}
    query = str(httpx.QueryParams({k: v for k, v in params.items() if v is not None}))
    result = run_command(as_json, lambda: call("GET", server, f"/api/v1/audit?{query}", token))
    if as_json:
        emit_json(result)
        return
    for e in result["data"]:
        who = f"{e['actor_kind']}:{e['actor']}" + (f" ({e['role']})" if e.get("role") else "")
        detail = " ".join(f"{k}={v}" for k, v in (e.get("detail") or {}).items())
        out_console.print(f"{e['at']}\t{who}\t{e['action']}\t{e['target']}\t{detail}".rstrip())
