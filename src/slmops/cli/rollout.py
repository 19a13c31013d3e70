"""`slmops rollout ...`: watch and steer the rollouts blueprint changes create.

    slmops rollout list [--blueprint B]     every rollout, newest first
    slmops rollout get ID [--devices]       counts, waves with the gate numbers, history;
                                            --devices pages through every device
    slmops rollout start|pause|resume|promote|abort|rollback ID [--reason R]
    slmops rollout wait ID [--timeout S]    block until it ends (exit 0 succeeded, 1 otherwise)

``wait`` is what a CI/CD job calls after ``slmops apply``: it exits 1 when the rollout is rolled
back, aborted or paused by a failing gate, printing the gate results that decided it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import urlencode

import typer
from rich.table import Table

from slmops.cli._output import console as err_console
from slmops.cli._output import emit_json, out_console, run_command
from slmops.cli.fleet import JsonOpt, ServerOpt, TokenOpt, call
from slmops.core.errors import CheckFailedError

app = typer.Typer(
    help="Watch and steer rollouts (created by `slmops apply`).", no_args_is_help=True
)
Id = Annotated[str, typer.Argument(help="rollout id, e.g. store-assistant-2")]
Reason = Annotated[str | None, typer.Option("--reason", help="recorded in the audit history")]
Wave = Annotated[
    int | None,
    typer.Option(
        "--wave", help="the wave (0 = canary) you saw; refused if the rollout has moved on"
    ),
]
STYLE = {
    "succeeded": "green",
    "running": "cyan",
    "paused": "yellow",
    "rolling-back": "red",
    "rolled-back": "red",
    "aborted": "red",
    "active": "green",
    "failed": "red",
}


def _styled(value: str | None) -> str:
    if value is None:
        return "-"
    color = STYLE.get(value)
    return f"[{color}]{value}[/]" if color else value


@app.command("list")
def list_command(
    server: ServerOpt,
    token: TokenOpt,
    blueprint: Annotated[str | None, typer.Option(help="only this blueprint's")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List rollouts, newest first."""
    query = f"?blueprint={blueprint}" if blueprint else ""
    result = run_command(as_json, lambda: call("GET", server, f"/api/v1/rollouts{query}", token))
    if as_json:
        emit_json(result)
        return
    table = Table("rollout", "blueprint", "target", "status", "wave", "devices")
    for r in result["data"]:
        wave = "-" if r["wave"] is None else f"{r['wave']} of 0..{r['waves'] - 1}"
        counts = ", ".join(f"{n} {s}" for s, n in r["by_status"].items())
        table.add_row(
            r["id"],
            r["blueprint"],
            release(r),
            _styled(r["status"]),
            wave,
            f"{r['devices']} ({counts})" if counts else str(r["devices"]),
        )
    out_console.print(table)


def release(r: dict[str, Any]) -> str:
    """MODEL:VERSION, and the adapters the release assigns (by name:version) if any."""
    text = f"{r['model']}:{r['target_version']}"
    adapters = r.get("adapters") or []
    if adapters:
        text += " + " + ", ".join(f"{a['adapter']}:{a['version']}" for a in adapters)
    return text


def _counts(r: dict[str, Any]) -> str:
    return ", ".join(f"{n} {s}" for s, n in r["by_status"].items()) or "no devices"


def print_rollout(r: dict[str, Any], *, devices: bool = True) -> None:
    """The rollout as a person reads it; ``devices``: the table of ``device_list`` too."""
    wave = "not started" if r["wave"] is None else f"at wave {r['wave']} of 0..{r['waves'] - 1}"
    out_console.print(
        f"[bold]{r['id']}[/] ({r['blueprint']}): {release(r)} "
        f"{_styled(r['status'])}, {wave}, {r['devices']} device(s) to move"
    )
    out_console.print(f"{r.get('matched', 0)} matched: {_counts(r)}")
    unplaceable = r.get("unplaceable") or {}
    if unplaceable:  # matched, but the target fits none of these: counted per reason
        reasons = "; ".join(f"{n}: {why}" for why, n in unplaceable.items())
        out_console.print(
            f"{r.get('matched', 0)} matched, {sum(unplaceable.values())} unplaceable ({reasons})"
        )
    waves = Table("wave", "size", "target", "moved", "outcome", "gates (observed vs threshold)")
    for w in r["wave_list"]:
        ev = w["decision"] or w["evaluation"]
        gates = "-"
        if ev:
            gates = "\n".join(
                f"{_styled(g['status'])} {g['gate']}: {g['detail']}" for g in ev["results"]
            )
        outcome = w["outcome"] or ("current" if w["index"] == r["wave"] else "-")
        by = f" by {w['ended_by']}" if w["ended_by"] else ""
        moved = f"{w.get('devices', 0)} ({w.get('succeeded', 0)} active)"
        waves.add_row(str(w["index"]), w["size"], str(w["target"]), moved, outcome + by, gates)
    out_console.print(waves)
    if devices:
        print_devices(r["device_list"])
    for h in r["history"][-6:]:
        who = h["actor"] or "slmops"
        out_console.print(f"  {h['from_status']} -> {h['to_status']} ({who}): {h['reason']}")


def print_devices(device_list: list[dict[str, Any]]) -> None:
    devices = Table("device", "class", "from", "wave", "state", "detail")
    for d in device_list:
        stage = f" at {d['failed_stage']}" if d["failed_stage"] else ""
        devices.add_row(
            d["device_id"],
            d["hardware_class"],
            d["from_version"] or "(none)",
            "-" if d["wave"] is None else str(d["wave"]),
            _styled(d["status"]) + stage,
            (d["detail"] or "")[:100],
        )
    out_console.print(devices)


def fetch_rollout(
    server: str,
    token: str,
    id: str,
    *,
    devices: bool,
    counts_only: bool = False,
    wave: int | None = None,
    status: str | None = None,
    page_size: int = 1000,
) -> dict[str, Any]:
    """The rollout; with ``devices``, every device (matching the filters) in ``device_list``,
    fetched page by page along the server's cursor; else the server's first page, or no device
    at all with ``counts_only`` (``limit=0``: the counts are in every page)."""
    params: dict[str, Any] = {}
    if devices:
        params["limit"] = page_size
    elif counts_only:
        params["limit"] = 0
    if wave is not None:
        params["wave"] = wave
    if status is not None:
        params["status"] = status
    query = f"?{urlencode(params)}" if params else ""
    first: dict[str, Any] = call("GET", server, f"/api/v1/rollouts/{id}{query}", token)
    if not devices:
        return first
    collected = list(first["device_list"])
    cursor = first["device_page"]["next"]
    while cursor is not None:
        query = urlencode({**params, "after": cursor})
        more = call("GET", server, f"/api/v1/rollouts/{id}?{query}", token)
        collected.extend(more["device_list"])
        cursor = more["device_page"]["next"]
    first["device_list"] = collected
    first["device_page"] = {**first["device_page"], "returned": len(collected), "next": None}
    return first


@app.command("get")
def get_command(
    id: Id,
    server: ServerOpt,
    token: TokenOpt,
    devices: Annotated[
        bool, typer.Option("--devices", help="list every device, fetched a page at a time")
    ] = False,
    wave: Annotated[
        int | None, typer.Option("--wave", min=0, help="with --devices: only this wave's")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="with --devices: only this status (queued, active, ...)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one rollout: counts, waves and the gate numbers that decided them, history; with
    --devices, every device (paged through the API's cursor). --json without --devices prints
    the API's first page (100 devices; ``device_page.next`` says whether there are more)."""
    result = run_command(
        as_json,
        lambda: fetch_rollout(
            server,
            token,
            id,
            devices=devices,
            counts_only=not as_json,
            wave=wave,
            status=status,
        ),
    )
    if as_json:
        emit_json(result)
        return
    print_rollout(result, devices=devices)


def _action(action: str, doc: str) -> None:
    def command(
        id: Id,
        server: ServerOpt,
        token: TokenOpt,
        reason: Reason = None,
        wave: Wave = None,
        as_json: JsonOpt = False,
    ) -> None:
        body: dict[str, Any] = {"reason": reason}
        if wave is not None:
            body["wave"] = wave
        path = f"/api/v1/rollouts/{id}/{action}"
        result = run_command(as_json, lambda: call("POST", server, path, token, body))
        if as_json:
            emit_json(result)
            return
        print_rollout(result, devices=False)

    command.__doc__ = doc
    app.command(action)(command)


_action("start", "Start a rollout created with `start: manual` (or scheduled).")
_action("pause", "Pause: no new devices are assigned until resume.")
_action("resume", "Resume a paused rollout; the current wave's timeout starts again.")
_action("promote", "Pass the current wave now and start the next one (gates skipped).")
_action("abort", "Stop assigning; devices already moved keep the target version.")
_action("rollback", "Stop and revert every moved device to the version it had before.")

FINAL = {"succeeded", "rolled-back", "aborted"}


def wait_for(
    server: str, token: str, id: str, *, timeout: float, quiet: bool, interval: float = 1.0
) -> dict[str, Any]:
    """Poll until the rollout ends or pauses; raise CheckFailedError unless it succeeded."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        r = call("GET", server, f"/api/v1/rollouts/{id}?limit=0", token)  # counts only
        at = "-" if r["wave"] is None else r["wave"]
        counts = ", ".join(f"{n} {s}" for s, n in r["by_status"].items())
        line = f"{r['status']} at wave {at} of 0..{r['waves'] - 1}: {counts}"
        if line != last and not quiet:
            err_console.print(f"[dim]{id}: {line}[/]")
            last = line
        if r["status"] == "succeeded":  # the view with its first page of devices
            done: dict[str, Any] = call("GET", server, f"/api/v1/rollouts/{id}", token)
            return done
        if r["status"] in FINAL or r["status"] == "paused":
            why = r["history"][-1]["reason"] if r["history"] else r["status"]
            raise CheckFailedError(
                f"rollout {id} is {r['status']}: {why}",
                where=f"rollout {id}",
                hint=f"slmops rollout get {id} shows the gates and devices",
            )
        if time.monotonic() > deadline:
            raise CheckFailedError(
                f"rollout {id} still {r['status']} after {timeout:g} s",
                where=f"rollout {id}",
                hint="raise --timeout, or look at the current wave's gates",
            )
        time.sleep(interval)


@app.command("wait")
def wait_command(
    id: Id,
    server: ServerOpt,
    token: TokenOpt,
    timeout: Annotated[float, typer.Option(help="seconds to wait at most")] = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Wait until the rollout ends: exit 0 when it succeeded, 1 when it was rolled back,
    aborted, paused by a failing gate, or did not end in time."""
    result = run_command(
        as_json, lambda: wait_for(server, token, id, timeout=timeout, quiet=as_json)
    )
    if as_json:
        emit_json(result)
        return
    print_rollout(result, devices=False)
