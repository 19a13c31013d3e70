"""Dependency aliases, so a route's signature says what it needs and who may call it.

``SessionDep`` is a database session for the request; ``ServicesDep`` the app's services
(``server/context.py``: the blob store, caches; ``.context()`` for a use case). ``ViewerDep``,
``OperatorDep`` and ``AdminDep`` authenticate an operator API token and require at least that
role (401 when the token is missing, malformed, unknown or revoked; 403 when its role is too
low). ``DeviceDep``
authenticates a device credential and yields that device's row only, so every device route
works on the caller's own record and nothing else.

Each request looks its caller up in the database (an indexed hash lookup): no process keeps
tokens in memory, so a token revoked through one API process is refused by all of them.

``get_session`` and ``get_settings`` are ``async`` on purpose: FastAPI runs every sync
dependency on the thread pool, and each hop (out to a worker thread and back to the event loop)
costs more than these do. Creating a Session does no I/O (it connects on first use, inside the
sync route or dependency that queries); closing one that has no transaction open does none
either, so only a session left mid-transaction (an error) is closed on a worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field, StringConstraints
from sqlalchemy.orm import Session

from slmops.server.context import Services
from slmops.server.db import find_api_token, find_device_by_credential
from slmops.server.db.models import ApiToken, Device
from slmops.server.db.session import Database
from slmops.server.errors import api_error
from slmops.server.security import Role, TokenKind, looks_like
from slmops.server.settings import ServerSettings

_operator_bearer = HTTPBearer(
    auto_error=False, scheme_name="OperatorToken", description="operator API token (slmo_...)"
)
_device_bearer = HTTPBearer(
    auto_error=False, scheme_name="DeviceCredential", description="device credential (slmd_...)"
)


async def get_session(request: Request) -> AsyncIterator[Session]:
    db: Database = request.app.state.db
    session = db.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]
Bearer = HTTPAuthorizationCredentials | None


def unauthorized(message: str, hint: str) -> HTTPException:
    return api_error(401, "unauthorized", message, where="Authorization", hint=hint)


UNKNOWN_DEVICE = (
    "unknown device credential",
    "the credential was rotated or the device removed; enroll again",
)


def checked_secret(secret: str | None, kind: TokenKind, what: str) -> str:
    """The bearer secret, shape-checked before any database lookup (401 otherwise)."""
    if not secret:
        raise unauthorized(f"missing {what}", "send 'Authorization: Bearer <token>'")
    if not looks_like(secret, kind):
        raise unauthorized(f"not a valid {what}", f"this API takes a {what} ({kind.value}_...)")
    return secret


def _secret(creds: Bearer, kind: TokenKind, what: str) -> str:
    return checked_secret(creds.credentials if creds else None, kind, what)


def require_role(role: Role) -> Callable[..., ApiToken]:
    """A dependency accepting live operator tokens whose role includes ``role``."""

    def _operator(
        session: SessionDep, creds: Annotated[Bearer, Depends(_operator_bearer)]
    ) -> ApiToken:
        secret = _secret(creds, TokenKind.API, "operator API token")
        token = find_api_token(session, secret=secret)
        if token is None:
            raise api_error(
                401,
                "unauthorized",
                "unknown or revoked API token",
                where="Authorization",
                hint="create one with `slmops server token create`",
            )
        if not Role(token.role).allows(role):
            raise api_error(
                403,
                "forbidden",
                f"role {token.role!r} may not do this; it needs {role.value!r}",
                where="Authorization",
                hint="use a token with a higher role",
            )
        return token

    return _operator


def current_device(
    session: SessionDep, creds: Annotated[Bearer, Depends(_device_bearer)]
) -> Device:
    secret = _secret(creds, TokenKind.DEVICE, "device credential")
    device = find_device_by_credential(session, secret=secret)
    if device is None:
        raise unauthorized(*UNKNOWN_DEVICE)
    return device


ViewerDep = Annotated[ApiToken, Depends(require_role(Role.VIEWER))]
OperatorDep = Annotated[ApiToken, Depends(require_role(Role.OPERATOR))]
AdminDep = Annotated[ApiToken, Depends(require_role(Role.ADMIN))]
DeviceDep = Annotated[Device, Depends(current_device)]

LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(max_length=128)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]
"""Label maps as operators send them: keys like ``site``, ``hw.class``, ``team/a``."""


def device_secret(authorization: str | None) -> str:
    """The device credential from an Authorization header, shape-checked (401 otherwise);
    for hot device routes that look the device up themselves, on their worker thread."""
    scheme, _, secret = (authorization or "").partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else ""
    return checked_secret(secret, TokenKind.DEVICE, "device credential")


INT64_MAX = 2**63 - 1
IdPath = Annotated[int, Path(ge=1, le=INT64_MAX, description="row id (int64)")]
"""A database row id in a path: past int64 is a 422, not an OverflowError from the driver."""
IdQuery = Annotated[int | None, Query(ge=1, le=INT64_MAX, description="row id (int64)")]
