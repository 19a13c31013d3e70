"""`slmops agent`: run the device daemon (enroll, poll desired state, install, serve).

Options override the optional config file (--config, YAML or JSON with the same keys as
AgentConfig). Bad input (malformed URL, plain http to a remote host, no enrollment token on a
first start, an enrollment token the server refuses) exits with code 2 before the loop starts;
after that the daemon never exits on its own: network trouble means backing off, not dying.

An idle agent's memory is its footprint on the device, so this module stays light: `slmops
agent` is dispatched here without loading the other commands (see ``cli/main.py``), and rich
(through ``cli._output``) is imported only when there is an error to render.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer


@contextmanager
def handled(as_json: bool) -> Iterator[None]:
    """``cli._output.handled`` (same messages, same exit codes), imported on the error path."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except (Exception, KeyboardInterrupt) as exc:
        from slmops.cli._output import handled as render

        with render(as_json):
            raise exc


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def agent_command(
    server: Annotated[
        str | None, typer.Option("--server", help="control plane URL, e.g. https://cp:8080")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="agent data dir (slots, credential, status)")
    ] = None,
    enroll_token: Annotated[
        str | None,
        typer.Option(
            "--enroll-token",
            envvar="SLMOPS_ENROLL_TOKEN",
            help="enrollment token (first start only; then the saved credential is used)",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML/JSON file with AgentConfig keys")
    ] = None,
    device_id: Annotated[
        str | None, typer.Option("--device-id", help="default: from the hostname, persisted")
    ] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="k=v,k2=v2 reported")] = None,
    model_ram_mb: Annotated[
        int | None, typer.Option("--model-ram-mb", help="RAM for the model (default: half)")
    ] = None,
    model_cores: Annotated[
        int | None, typer.Option("--model-cores", help="cores for the model (default: all)")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="inference threads")] = None,
    api_host: Annotated[
        str | None, typer.Option("--api-host", help="OpenAI API interface (127.0.0.1)")
    ] = None,
    api_port: Annotated[
        int | None, typer.Option("--api-port", help="OpenAI API port (8180; 0 = any)")
    ] = None,
    trusted_key: Annotated[
        list[Path] | None, typer.Option("--trusted-key", help="public key file (repeatable)")
    ] = None,
    poll_seconds: Annotated[
        float | None, typer.Option("--poll-seconds", help="override the server's interval")
    ] = None,
    backoff_cap: Annotated[
        float | None, typer.Option("--backoff-cap", help="longest wait while offline (300 s)")
    ] = None,
    allow_http: Annotated[
        bool | None, typer.Option("--allow-http", help="allow plain http to a remote server")
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="device profile name, if known")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning")] = "info",
    as_json: Annotated[
        bool, typer.Option("--json", help="log JSON lines on stderr; errors as JSON on stdout")
    ] = False,
) -> None:
    """Run the agent: enroll, keep the desired model installed, serve it on localhost."""
    with handled(as_json):
        from slmops.agent.config import load_config, parse_labels
        from slmops.agent.daemon import Agent

        _setup_logging(log_level, as_json)
        cfg = load_config(
            config,
            server=server,
            data_dir=data,
            enroll_token=enroll_token,
            device_id=device_id,
            labels=parse_labels(labels) if labels is not None else None,
            model_ram_mb=model_ram_mb,
            model_cores=model_cores,
            threads=threads,
            api_host=api_host,
            api_port=api_port,
            trusted_keys=trusted_key or None,
            poll_seconds=poll_seconds,
            backoff_cap_seconds=backoff_cap,
            allow_http=allow_http,
            profile=profile,
        )
        agent = Agent(cfg)
        if as_json:
            emit_json({"server": cfg.server, "data": str(cfg.data_dir), "api_port": cfg.api_port})
        agent.run()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"time": record.created, "level": record.levelname, "message": record.getMessage()}
        )


def _setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("slmops")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False


def main(prog_name: str | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(agent_command)
    app(prog_name=prog_name)


if __name__ == "__main__":
    main()
