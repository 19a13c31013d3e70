"""`slmops rollout ...`: watch and steer the rollouts blueprint changes create.

    slmops rollout list [--blueprint B]     every rollout, newest first
    slmops rollout get ID                   waves with the gate numbers, devices, history
    slmops rollout start|pause|resume|promote|abort|rollback ID [--reason R]
    slmops rollout wait ID [--timeout S]    block until it ends (exit 0 succeeded, 1 otherwise)

``wait`` is what a CI/CD job calls after ``slmops apply``: it exits 1 when the rollout is rolled
back, aborted or paused by a failing gate, printing the gate results that decided it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

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
            f"{r['model']}:{r['target_version']}",
            _styled(r["status"]),
            wave,
            f"{r['devices']} ({counts})" if counts else str(r["devices"]),
        )
    out_console.print(table)


def print_rollout(r: dict[str, Any]) -> None:
    wave = "not started" if r["wave"] is None else f"at wave {r['wave']} of 0..{r['waves'] - 1}"
    out_console.print(
        f"[bold]{r['id']}[/] ({r['blueprint']}): {r['model']}:{r['target_version']} "
        f"{_styled(r['status'])}, {wave}, {r['devices']} device(s) to move"
    )
    waves = Table("wave", "size", "target", "outcome", "gates (observed vs threshold)")
    for w in r["wave_list"]:
        ev = w["decision"] or w["evaluation"]
        gates = "-"
        if ev:
            gates = "\n".join(
                f"{_styled(g['status'])} {g['gate']}: {g['detail']}" for g in ev["results"]
            )
        outcome = w["outcome"] or ("current" if w["index"] == r["wave"] else "-")
        by = f" by {w['ended_by']}" if w["ended_by"] else ""
        waves.add_row(str(w["index"]), w["size"], str(w["target"]), outcome + by, gates)
    out_console.print(waves)
    devices = Table("device", "class", "from", "wave", "state", "detail")
    for d in r["device_list"]:
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
    for h in r["history"][-6:]:
        who = h["actor"] or "slmops"
        out_console.print(f"  {h['from_status']} -> {h['to_status']} ({who}): {h['reason']}")


@app.command("get")
def get_command(id: Id, server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    """Show one rollout: waves and the gate numbers that decided them, devices, history."""
    result = run_command(as_json, lambda: call("GET", server, f"/api/v1/rollouts/{id}", token))
    if as_json:
        emit_json(result)
        return
    print_rollout(result)


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
        print_rollout(result)

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
        r = call("GET", server, f"/api/v1/rollouts/{id}", token)
        at = "-" if r["wave"] is None else r["wave"]
        counts = ", ".join(f"{n} {s}" for s, n in r["by_status"].items())
        line = f"{r['status']} at wave {at} of 0..{r['waves'] - 1}: {counts}"
        if line != last and not quiet:
            err_console.print(f"[dim]{id}: {line}[/]")
            last = line
        if r["status"] == "succeeded":
            return r
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
    print_rollout(result)
