"""`slmops fleet simulate`: a simulated fleet against a real control plane.

    slmops fleet simulate --server URL --enroll-token T --devices 1000 --poll 60 --duration 120
        [--accelerate 10] [--failure-rate 0.05] [--fail-version 2.0.0=1.0] [--offline-rate 0.01]
        [--concurrency 64] [--converge-version 2.0.0 --until-converged] [--ceiling] [--json]

One asyncio process enrolls N devices with the enrollment token and runs them through the
device protocol (slmops/fleet/simulator.py). ``--canned`` runs the same simulation against a
canned responder instead of a server, and ``--ceiling`` adds that run after the real one, so
what the simulator alone can drive is printed beside what the server sustained.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from slmops.cli._output import console as err_console
from slmops.cli._output import emit_json, out_console, run_command
from slmops.core.errors import UserInputError
from slmops.fleet.canned import canned_server
from slmops.fleet.simulator import SimConfig, Simulator

app = typer.Typer(help="Simulate a fleet of devices against a control plane.", no_args_is_help=True)

CANNED_TOKEN = "slme_canned-simulator"


def _pairs(values: list[str], option: str, *, number: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(
                f"expected KEY=VALUE, got {item!r}", where=option, hint=f"e.g. {option} a=1"
            )
        try:
            out[key] = float(value) if number else value
        except ValueError:
            raise UserInputError(
                f"{value!r} is not a number", where=f"{option} {item}", hint="e.g. 2.0.0=0.5"
            ) from None
    return out


def _row(table: Table, name: str, *values: object) -> None:
    table.add_row(name, *("-" if v is None else str(v) for v in values))


def render(report: dict[str, Any], ceiling: dict[str, Any] | None) -> Table:
    """The report as a table, the canned ceiling in a second column when measured."""
    table = Table(
        title=f"fleet simulation: {report['enrolled']} devices on {report['servers']} server(s)"
    )
    table.add_column("figure")
    table.add_column("server", justify="right")
    if ceiling:
        table.add_column("simulator ceiling (canned)", justify="right")
    keys: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("enrolled / devices", lambda r: f"{r['enrolled']}/{r['devices']}"),
        ("enroll per s", lambda r: r["enroll_per_s"]),
        ("offered check-ins per s", lambda r: r["offered_checkins_per_s"]),
        ("check-ins per s", lambda r: r["checkins_per_s"]),
        ("check-in p50 ms", lambda r: r["checkin_p50_ms"]),
        ("check-in p99 ms", lambda r: r["checkin_p99_ms"]),
        ("304 ratio", lambda r: r["ratio_304"]),
        ("errors", lambda r: r["error_count"]),
        ("schedule lag p99 ms", lambda r: r["schedule_lag_p99_ms"]),
        ("time to converge s", lambda r: r["time_to_converge_s"]),
        ("devices told >1 target", lambda r: r["devices_told_multiple_targets"]),
        ("final versions", lambda r: r["final_versions"]),
    ]
    for name, get in keys:
        _row(table, name, get(report), *([get(ceiling)] if ceiling else []))
    for kind, n in report["errors"].items():
        _row(table, f"  error {kind}", n, *([""] if ceiling else []))
    for kind, n in report["events"].items():
        _row(table, f"  event {kind}", n, *([""] if ceiling else []))
    return table


def _progress_table(snap: dict[str, Any]) -> Table:
    t = Table(title="simulating", show_header=False)
    t.add_row("elapsed s", str(snap["t"]))
    t.add_row(
        "check-ins", f"{snap['checkins']} ({snap['checkins_per_s']}/s, p99 {snap['p99_ms']} ms)"
    )
    t.add_row("errors", str(snap["errors"]))
    t.add_row("versions", ", ".join(f"{k}: {v}" for k, v in snap["versions"].items()))
    t.add_row("installing / offline", f"{snap['installing']} / {snap['offline']}")
    t.add_row("converged at s", str(snap["converged_at"]))
    return t


def _run(cfg: SimConfig, live: Live | None) -> dict[str, Any]:
    on_sample = None if live is None else (lambda snap: live.update(_progress_table(snap)))
    return asyncio.run(Simulator(cfg, on_sample).run())


def _canned_run(cfg: SimConfig, live: Live | None) -> dict[str, Any]:
    with canned_server() as url:
        canned = SimConfig(**{**cfg.__dict__, "servers": [url] * len(cfg.servers)})
        canned.enroll_token = CANNED_TOKEN
        canned.converge_version = None
        canned.until_converged = False
        return _run(canned, live)


@app.command("simulate")
def simulate_command(
    server: Annotated[
        list[str],
        typer.Option(
            "--server",
            help="control plane URL; repeat to spread devices over several API processes",
        ),
    ] = [],  # noqa: B006
    enroll_token: Annotated[
        str,
        typer.Option(
            "--enroll-token", envvar="SLMOPS_ENROLL_TOKEN", help="enrollment token (slme_...)"
        ),
    ] = "",
    devices: Annotated[int, typer.Option("--devices", min=1, help="simulated devices")] = 100,
    poll: Annotated[
        float, typer.Option("--poll", help="poll interval in (simulated) seconds")
    ] = 60.0,
    duration: Annotated[
        float, typer.Option("--duration", help="wall-clock seconds to simulate after enrolling")
    ] = 60.0,
    accelerate: Annotated[
        float, typer.Option("--accelerate", help="divide poll intervals and latencies by K")
    ] = 1.0,
    failure_rate: Annotated[
        float,
        typer.Option("--failure-rate", help="probability an install fails (at a random stage)"),
    ] = 0.0,
    fail_version: Annotated[
        list[str], typer.Option("--fail-version", help="VERSION=RATE: failure rate for one version")
    ] = [],  # noqa: B006
    offline_rate: Annotated[
        float,
        typer.Option("--offline-rate", help="probability per poll of going offline for 2-6 polls"),
    ] = 0.0,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="connections per server")
    ] = 64,
    latency: Annotated[
        list[str],
        typer.Option("--latency", help="PHASE=SECONDS, e.g. downloading=20 (before --accelerate)"),
    ] = [],  # noqa: B006
    label: Annotated[
        list[str], typer.Option("--label", help="KEY=VALUE on every device (plus hw= and site=)")
    ] = [],  # noqa: B006
    prefix: Annotated[
        str, typer.Option("--prefix", help="device id prefix (default: sim-<random>)")
    ] = "",
    converge_version: Annotated[
        str | None,
        typer.Option(
            "--converge-version",
            help="converged when every device runs it (default: what each was told)",
        ),
    ] = None,
    until_converged: Annotated[
        bool, typer.Option("--until-converged", help="stop once converged")
    ] = False,
    no_telemetry: Annotated[
        bool, typer.Option("--no-telemetry", help="post no telemetry windows")
    ] = False,
    telemetry_window: Annotated[
        float | None,
        typer.Option(
            "--telemetry-window", help="seconds per telemetry window (default: the server's policy)"
        ),
    ] = None,
    fetch: Annotated[
        bool, typer.Option("--fetch", help="download manifests and blobs on install")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds per request")] = 10.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    canned: Annotated[
        bool,
        typer.Option("--canned", help="run against a canned responder: the simulator's ceiling"),
    ] = False,
    ceiling: Annotated[
        bool, typer.Option("--ceiling", help="also measure the canned ceiling and print it beside")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON document on stdout")
    ] = False,
) -> None:
    """Enroll N simulated devices and run them through the device protocol; report what the
    fleet saw (check-ins/s, p50/p99, errors, 304 ratio, versions over time, convergence)."""

    def go() -> None:
        if not canned and not server:
            raise UserInputError(
                "no --server given",
                where="--server",
                hint="pass the control plane URL, or --canned",
            )
        if not canned and not enroll_token:
            raise UserInputError(
                "no --enroll-token given",
                where="--enroll-token",
                hint="slmops server enrollment-token create",
            )
        cfg = SimConfig(
            servers=list(server) or ["http://127.0.0.1:1"],
            enroll_token=enroll_token or CANNED_TOKEN,
            devices=devices,
            poll=poll,
            duration=duration,
            accelerate=accelerate,
            failure_rate=failure_rate,
            fail_versions=_pairs(fail_version, "--fail-version", number=True),
            offline_rate=offline_rate,
            concurrency=concurrency,
            labels=_pairs(label, "--label", number=False),
            prefix=prefix,
            converge_version=converge_version,
            until_converged=until_converged,
            telemetry=not no_telemetry,
            telemetry_seconds=telemetry_window,
            fetch=fetch,
            timeout=timeout,
            seed=seed,
            sample_seconds=max(0.5, duration / 120),
        )
        cfg.latencies |= _pairs(latency, "--latency", number=True)
        cfg.check()
        live = None if as_json else Live(console=err_console, refresh_per_second=2, transient=True)
        if live is not None:
            live.start()
        try:
            report = _canned_run(cfg, live) if canned else _run(cfg, live)
            floor = _canned_run(cfg, live) if ceiling and not canned else None
        finally:
            if live is not None:
                live.stop()
        if floor is not None:
            report["ceiling"] = floor
        if as_json:
            emit_json(report)
        else:
            out_console.print(render(report, floor))

    run_command(as_json, go)
