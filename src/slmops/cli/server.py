"""`slmops server run`, `server token create`, `server enrollment-token create|revoke`.

The token commands write to the database directly (the same code the API runs), so the first
admin token can be made before any server is up, and it works with a server already running
on the same database: nothing is cached in the server processes.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from slmops.cli._output import console, emit_json, handled, out_console
from slmops.core.errors import ConfigError

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
DataOpt = Annotated[
    Path, typer.Option("--data", help="data directory (SQLite database slmops.db lives here)")
]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="database URL, e.g. postgresql://user@host/slmops (default SQLite)"),
]

app = typer.Typer(help="The control plane: API server and its tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Operator API tokens.", no_args_is_help=True)
enrollment_app = typer.Typer(help="Enrollment tokens for devices.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(enrollment_app, name="enrollment-token")

_DURATION = re.compile(r"^(\d+)([smhdw]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` (a bare number is seconds)."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ConfigError(
            f"not a duration: {text!r}", where="--expires-in", hint="use e.g. 30m, 12h, 7d, 2w"
        )
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def parse_labels(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` into a dict; keys follow the API's label rules."""
    labels: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z", key.strip()):
            raise ConfigError(
                f"bad label {part!r}", where="--labels", hint="write k=v,k2=v2 (keys: a-z 0-9 ._/-)"
            )
        labels[key.strip()] = value.strip()
    return labels


def _settings(data: Path, db: str | None, **extra: Any) -> Any:
    from slmops.server.settings import load_settings

    return load_settings(data_dir=data, db_url=db, **extra)


@app.command("run")
def run_command(
    data: DataOpt,
    db: DbOpt = None,
    host: Annotated[str, typer.Option("--host", help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port")] = 8080,
    allow_public: Annotated[
        bool, typer.Option("--allow-public", help="allow 0.0.0.0 (put TLS in front)")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="API processes")] = 1,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
    as_json: JsonOpt = False,
) -> None:
    """Serve the operator API (/api/v1) and the device API (/device/v1)."""
    with handled(as_json):
        import uvicorn
        from sqlalchemy.engine import make_url

        from slmops.server.app import create_app
        from slmops.server.db.session import open_database

        settings = _settings(data, db, host=host, port=port, allow_public=allow_public)
        open_database(settings).dispose()  # migrate once, before any worker starts
        shown_db = make_url(settings.database_url).render_as_string(hide_password=True)
        info = {"url": f"http://{host}:{port}", "database": shown_db, "workers": workers}
        if as_json:
            emit_json(info)
        else:
            console.print(
                f"slmops server on [bold]{info['url']}[/] (database {shown_db})", soft_wrap=True
            )
        if workers == 1:
            uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
            return
        # Workers import the app factory and rebuild the same settings from the environment.
        os.environ.update(
            SLMOPS_DATA_DIR=str(settings.data_dir),
            SLMOPS_HOST=host,
            SLMOPS_PORT=str(port),
            SLMOPS_ALLOW_PUBLIC="1" if allow_public else "0",
        )
        if db:
            os.environ["SLMOPS_DB_URL"] = db
        from slmops.server.listen import serve_workers

        serve_workers(
            "slmops.server.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )


@token_app.command("create")
def token_create_command(
    data: DataOpt,
    role: Annotated[str, typer.Option("--role", help="admin, operator or viewer")],
    name: Annotated[str | None, typer.Option("--name", help="who or what uses it")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an operator API token; the token is printed this once and never stored."""
    with handled(as_json):
        from slmops.server.db import create_api_token
        from slmops.server.db.session import open_database
        from slmops.server.security import Role

        try:
            parsed = Role(role)
        except ValueError:
            raise ConfigError(
                f"unknown role {role!r}", where="--role", hint="use admin, operator or viewer"
            ) from None
        database = open_database(_settings(data, db))
        try:
            with database.sessions() as session:
                issued = create_api_token(session, name=name or f"{role}-token", role=parsed)
                row = issued.row
        finally:
            database.dispose()
        if as_json:
            emit_json({"id": row.id, "name": row.name, "role": row.role, "token": issued.secret})
            return
        console.print(
            f"created {row.role} token {row.id} ({row.name}); it is shown only now:",
            soft_wrap=True,
        )
        out_console.print(issued.secret, soft_wrap=True)


@enrollment_app.command("create")
def enrollment_create_command(
    data: DataOpt,
    labels: Annotated[
        str | None, typer.Option("--labels", help="k=v,... given to every enrolled device")
    ] = None,
    expires_in: Annotated[str, typer.Option("--expires-in", help="e.g. 12h, 7d")] = "7d",
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a reusable, expiring enrollment token scoped to labels (printed this once)."""
    with handled(as_json):
        from slmops.server.api.operator.enrollment import check_lifetime
        from slmops.server.audit import CLI_ACTOR, record
        from slmops.server.db import create_enrollment_token
        from slmops.server.db.models import as_utc, utcnow
        from slmops.server.db.session import open_database

        parsed = parse_labels(labels)
        settings = _settings(data, db)
        lifetime = parse_duration(expires_in)
        try:
            check_lifetime(int(lifetime.total_seconds()), settings.enrollment_token_max_seconds)
        except ValueError as exc:
            raise ConfigError(str(exc), where="--expires-in", hint="e.g. 7d") from None
        expires_at = utcnow() + lifetime
        database = open_database(settings)
        try:
            with database.sessions() as session:
                issued = create_enrollment_token(session, labels=parsed, expires_at=expires_at)
                row = issued.row
                record(
                    session,
                    CLI_ACTOR,
                    "enrollment-token.create",
                    f"enrollment-token/{row.id}",
                    labels=parsed or None,
                    expires_at=expires_at.isoformat(),
                )
                session.commit()
        finally:
            database.dispose()
        doc = {
            "id": row.id,
            "labels": row.labels,
            "expires_at": as_utc(row.expires_at).isoformat(),
            "token": issued.secret,
        }
        if as_json:
            emit_json(doc)
            return
        console.print(
            f"created enrollment token {row.id} (labels {parsed or 'none'}, expires "
            f"{doc['expires_at']}); it is shown only now:",
            soft_wrap=True,
        )
        out_console.print(issued.secret, soft_wrap=True)


@enrollment_app.command("revoke")
def enrollment_revoke_command(
    token_id: Annotated[str, typer.Argument(help="the token's id (enr_...), not its secret")],
    data: DataOpt,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke an enrollment token: enrollments with it are refused from now on (devices it
    already enrolled keep their credentials)."""
    with handled(as_json):
        from slmops.server.api.operator.enrollment import revoke_token
        from slmops.server.audit import CLI_ACTOR
        from slmops.server.db.models import as_utc
        from slmops.server.db.session import open_database

        database = open_database(_settings(data, db))
        try:
            with database.sessions() as session:
                row = revoke_token(session, token_id, CLI_ACTOR)
                if row is None:
                    raise ConfigError(
                        f"no enrollment token {token_id!r}",
                        where="TOKEN_ID",
                        hint="give the id (enr_...) printed when it was created",
                    )
                session.commit()
                revoked_at = as_utc(row.revoked_at).isoformat() if row.revoked_at else None
        finally:
            database.dispose()
        if as_json:
            emit_json({"id": token_id, "revoked_at": revoked_at})
            return
        out_console.print(f"enrollment token {token_id} revoked at {revoked_at}")


if __name__ == "__main__":
    app()
