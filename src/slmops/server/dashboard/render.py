"""Template rendering: one autoescaping Jinja2 environment and a few display filters."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from slmops import __version__
from slmops.core.units import fmt_bytes
from slmops.server.dashboard.auth import UiUser

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"


def when(value: datetime | float | None) -> str:
    """UTC time to the second for datetimes and epoch seconds alike."""
    if value is None:
        return "never"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(seconds: float | None) -> str:
    """``42 s``, ``5 min``, ``3 h``, ``2 d`` (None: never seen)."""
    if seconds is None:
        return "never"
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


size = fmt_bytes  # the one byte formatter (core/units), so the dashboard agrees with reports


def num(value: float | None) -> str:
    if value is None:
        return "n/a"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(when=when, age=age, size=size, num=num)
_env.globals.update(version=__version__)


def render(
    request: Request,
    template: str,
    user: UiUser | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """Render a page; ``msg``/``err`` query parameters become the flash line."""
    html = _env.get_template(template).render(
        request=request,
        user=user,
        path=request.url.path,
        flash=request.query_params.get("msg"),
        flash_error=request.query_params.get("err"),
        now=time.time(),
        **context,
    )
    return HTMLResponse(
        html,
        status_code=status_code,
        headers={
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "same-origin",
            "Content-Security-Policy": (
                "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                "script-src 'self'; form-action 'self'; frame-ancestors 'none'"
            ),
        },
    )
