"""`slmops improve` (one job, local) and `slmops improve-worker` (jobs from the control plane).

The worker is where the ML stack, the original model and the signing key live; the control plane
only queues jobs (from feedback rules) and receives results. For each claimed job the worker
pulls the running version from the control plane's registry, runs the improvement pipeline
(``feedback/improve.py``), pushes a passing candidate as the version the claim named, and posts
the result, which proposes the rollout.
"""

from __future__ import annotations

import shutil
import socket
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from slmops.cli._output import emit_json, out_console, run_command
from slmops.cli.fleet import JsonOpt, ServerOpt, TokenOpt, call
from slmops.core.errors import SlmopsError, UserInputError

DirectionOpt = Annotated[
    str, typer.Option("--direction", help="higher-precision (quality fell) or smaller (memory)")
]
ModelOpt = Annotated[
    Path, typer.Option("--model", help="the original model the running variant was made from")
]
KeyOpt = Annotated[Path, typer.Option("--key", help="private key to sign the candidate bundle")]


def _direction(text: str) -> Any:
    from slmops.optimize.adjust import DIRECTIONS

    if text not in DIRECTIONS:
        raise UserInputError(
            f"unknown direction {text!r}",
            where="--direction",
            hint="use " + " or ".join(DIRECTIONS),
        )
    return text


def print_candidate(c: dict[str, Any]) -> None:
    for check in c["checks"]:
        mark = "[green]pass[/]" if check["ok"] else "[red]fail[/]"
        out_console.print(f"  {mark} {check['name']}: {check['detail']}")
    if c["ok"]:
        out_console.print(f"candidate [bold]{c['version']}[/] signed: {c['bundle']}")
    else:
        out_console.print("[red]no candidate[/]: " + "; ".join(c["reasons"]))


def improve_command(
    bundle: Annotated[Path, typer.Argument(help="the running version's bundle (layout dir)")],
    variant: Annotated[str, typer.Option("--variant", help="the variant the profile runs")],
    model: ModelOpt,
    profile: Annotated[str, typer.Option("--profile", help="the device profile to improve for")],
    version: Annotated[str, typer.Option("--version", help="version of the candidate bundle")],
    key: KeyOpt,
    direction: DirectionOpt = "higher-precision",
    name: Annotated[str | None, typer.Option("--name", help="bundle name (default: same)")] = None,
    out: Annotated[Path, typer.Option("--out", help="job work directory")] = Path("improve"),
    as_json: JsonOpt = False,
) -> None:
    """Run one improvement job locally: adjusted recipe, optimize, evaluate, gate, bundle, sign.

    Exit 1 when the candidate does not pass its gate (the reasons are printed)."""
    from slmops.core.errors import CheckFailedError
    from slmops.feedback.improve import improve, running_variant

    def go() -> dict[str, Any]:
        bundle_name = name
        if bundle_name is None:
            from slmops.bundle.inspect import inspect_bundle

            bundle_name = str(inspect_bundle(bundle)["name"])
        running_variant(bundle, variant)  # a wrong variant is reported before any work
        c = improve(
            bundle=bundle,
            variant=variant,
            model=model,
            direction=_direction(direction),
            profile=profile,
            name=bundle_name,
            version=version,
            workdir=out,
            private_key=key,
            quiet=as_json,
        ).to_dict()
        if not as_json:
            print_candidate(c)
        if not c["ok"]:
            raise CheckFailedError(
                "the candidate did not pass its gate: " + "; ".join(c["reasons"]),
                where=out,
                hint="see the report in " + c["report"],
            )
        return c

    result = run_command(as_json, go)
    if as_json:
        emit_json(result)


def run_job(
    server: str, token: str, job: dict[str, Any], model: Path, key: Path, workdir: Path, quiet: bool
) -> dict[str, Any]:
    """Pull, improve, push; returns the result body to post."""
    from slmops.bundle.registry import pull, push
    from slmops.feedback.improve import improve

    host = server.split("://", 1)[-1].rstrip("/")
    allow_http = server.startswith("http://")
    jobdir = workdir / f"job-{job['id']}"
    shutil.rmtree(jobdir, ignore_errors=True)
    current = jobdir / "current"
    pull(
        f"oci://{host}/{job['model']}:{job['version']}", current, token=token, allow_http=allow_http
    )
    candidate = improve(
        bundle=current,
        variant=job["variant"],
        model=model,
        direction=job["direction"],
        profile=job["profile"],
        name=job["model"],
        version=job["new_version"],
        workdir=jobdir,
        private_key=key,
        quiet=quiet,
    ).to_dict()
    if candidate["ok"]:
        push(
            Path(candidate["bundle"]),
            f"oci://{host}/{job['model']}:{job['new_version']}",
            token=token,
            allow_http=allow_http,
        )
    detail = "gate passed" if candidate["ok"] else "; ".join(candidate["reasons"])
    return {
        "ok": candidate["ok"],
        "new_version": job["new_version"],
        "detail": detail,
        "candidate": candidate,
    }


def _claim(server: str, token: str, worker: str) -> dict[str, Any] | None:
    """The next queued job, or None (the API answers 204 when there is none)."""
    doc = call("POST", server, "/api/v1/jobs/claim", token, {"worker": worker})
    return doc or None


def _post_result(server: str, token: str, job_id: int, body: dict[str, Any]) -> dict[str, Any]:
    return call("POST", server, f"/api/v1/jobs/{job_id}/result", token, body)


def improve_worker_command(
    server: ServerOpt,
    token: TokenOpt,
    model: ModelOpt,
    key: KeyOpt,
    workdir: Annotated[Path, typer.Option("--workdir", help="where jobs run")] = Path("jobs"),
    once: Annotated[bool, typer.Option("--once", help="run at most one job, then exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between polls when idle")] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Run improvement jobs the control plane's feedback rules queue, until stopped."""

    def check() -> None:
        if not model.is_dir():
            raise UserInputError("model directory not found", where=model, hint="pass --model DIR")
        if not key.is_file():
            raise UserInputError("signing key not found", where=key, hint="pass --key FILE")

    run_command(as_json, check)
    worker = f"{socket.gethostname()}:{workdir.resolve()}"
    done: list[dict[str, Any]] = []
    while True:
        job = run_command(as_json, lambda: _claim(server, token, worker))
        if not job:
            if once:
                break
            time.sleep(interval)
            continue
        if not as_json:
            out_console.print(
                f"job {job['id']}: {job['direction']} for {job['profile']} "
                f"({job['model']}:{job['version']} {job['variant']}) -> {job['new_version']}"
            )
        try:
            body = run_job(server, token, job, model, key, workdir, as_json)
        except SlmopsError as exc:
            body = {"ok": False, "detail": exc.render()[:4000], "candidate": {}}
        posted = run_command(as_json, partial(_post_result, server, token, job["id"], body))
        done.append(posted)
        if not as_json:
            state = posted["status"]
            extra = f", rollout {posted['rollout_id']}" if posted.get("rollout_id") else ""
            out_console.print(f"job {job['id']}: {state}{extra} ({body['detail'][:200]})")
        if once:
            break
    if as_json:
        emit_json({"jobs": done})
