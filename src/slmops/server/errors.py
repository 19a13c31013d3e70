"""One JSON error envelope for the whole HTTP API, whatever raised the error.

    {"error": {"code": "not_found", "message": "...", "where": "device_id", "hint": "..."}}

Routes raise :func:`api_error` (an ``HTTPException`` whose detail already is the envelope's
body); FastAPI's own errors (404 for unknown paths, 405, request validation) and slmops errors
are rendered into the same shape by the handlers installed with :func:`install_error_handlers`,
so clients (the agent, the CLI, the dashboard) parse one shape only.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmops.core.errors import SlmopsError, UserInputError

log = logging.getLogger(__name__)

_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    422: "invalid_request",
    500: "internal",
}


def envelope(
    code: str, message: str, *, where: str | None = None, hint: str | None = None
) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "where": where, "hint": hint}}


def api_error(
    status: int,
    code: str,
    message: str,
    *,
    where: str | None = None,
    hint: str | None = None,
    headers: dict[str, str] | None = None,
) -> HTTPException:
    """An HTTPException the handler renders as the envelope; ``raise api_error(...)``."""
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return HTTPException(
        status, detail=envelope(code, message, where=where, hint=hint)["error"], headers=headers
    )


_OCI_CODES = {404: "NAME_UNKNOWN", 405: "UNSUPPORTED", 413: "SIZE_INVALID"}


def in_registry(path: str) -> bool:
    """Paths of the OCI registry, whose clients parse the OCI error shape, not the envelope."""
    return path == "/v2" or path.startswith("/v2/")


def oci_body(status: int, message: str) -> dict[str, Any]:
    """The OCI Distribution error body (``{"errors": [{"code", "message", "detail"}]}``)."""
    code = _OCI_CODES.get(status, "UNAUTHORIZED" if status == 401 else "UNSUPPORTED")
    return {"errors": [{"code": code, "message": message, "detail": None}]}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # registered for this type only
        raise exc
    if isinstance(exc.detail, dict) and "code" in exc.detail:
        body = {"error": exc.detail}
    else:
        code = _DEFAULT_CODES.get(exc.status_code, f"http_{exc.status_code}")
        body = envelope(code, str(exc.detail), where=request.url.path)
    if in_registry(request.url.path):  # an unrouted /v2 path, or a body over the limit
        body = oci_body(exc.status_code, str(body["error"]["message"]))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ())) or None
    message = str(first.get("msg", "invalid request"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    body = envelope(
        "invalid_request", message, where=where, hint="fix the field; unknown keys are refused"
    )
    return JSONResponse(body, status_code=422)


async def _slmops_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, SlmopsError):
        raise exc
    status = 400 if isinstance(exc, UserInputError) else 500
    code = "bad_request" if status == 400 else "internal"
    return JSONResponse(
        envelope(code, exc.message, where=exc.where, hint=exc.hint), status_code=status
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = envelope(
        "internal",
        f"internal error: {type(exc).__name__}",
        where=request.url.path,
        hint="this is a bug in slmops; the server log has the traceback",
    )
    return JSONResponse(body, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(SlmopsError, _slmops_error)
    app.add_exception_handler(Exception, _unexpected)
