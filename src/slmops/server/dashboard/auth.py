"""Dashboard sessions and CSRF, without server-side state.

The session cookie holds the operator API token itself (``slmops_ui``; HttpOnly, SameSite=Strict,
Path=/ui, Secure when served over https, 12 h Max-Age). Every request looks the token up with
``find_api_token``, exactly as the API does for a bearer token, so a revoked token ends its
dashboard sessions in every server process at once, and no signing secret has to be shared
between processes. JavaScript never sees the cookie.

CSRF: every form carries ``csrf`` = HMAC-SHA256(token, "slmops-ui-csrf"), which only a holder of
the token can compute; POSTs are refused (403) without it, and also when an ``Origin`` header
names another site. SameSite=Strict already keeps the cookie off cross-site requests; the token
is the second, independent layer. Roles are checked server-side on every POST (a viewer gets 403
whatever the page showed).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from slmops.server.api.deps import SessionDep
from slmops.server.db import find_api_token
from slmops.server.db.models import ApiToken
from slmops.server.security import Role, TokenKind, looks_like

COOKIE = "slmops_ui"
COOKIE_PATH = "/ui"
MAX_AGE = 12 * 3600
_CSRF_MSG = b"slmops-ui-csrf"
MAX_FORM_BYTES = 64 << 10


class LoginRequired(Exception):
    """No valid session: the handler redirects to the login page (back to ``next`` after)."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class Forbidden(Exception):
    """A POST refused: wrong role, missing/bad CSRF token or a foreign Origin (403 page)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class UiUser:
    token: ApiToken
    name: str
    role: Role
    csrf: str

    @property
    def can_operate(self) -> bool:
        return self.role.allows(Role.OPERATOR)


def csrf_for(secret: str) -> str:
    return hmac.new(secret.encode(), _CSRF_MSG, hashlib.sha256).hexdigest()


def check_token(session: Session, secret: str) -> ApiToken | None:
    """The live operator token for ``secret`` (None for anything else, malformed included)."""
    secret = secret.strip()
    if not looks_like(secret, TokenKind.API):
        return None
    return find_api_token(session, secret=secret)


def login_url(next_path: str) -> str:
    return "/ui/login?next=" + quote(next_path, safe="/")


def safe_next(value: str | None) -> str:
    """Only local dashboard paths: never an open redirect."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"


def current_user(request: Request, session: SessionDep) -> UiUser:
    secret = request.cookies.get(COOKIE)
    token = check_token(session, secret) if secret else None
    if secret is None or token is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(path if request.method == "GET" else "/ui/")
    return UiUser(token=token, name=token.name, role=Role(token.role), csrf=csrf_for(secret))


UserDep = Annotated[UiUser, Depends(current_user)]


async def form_data(request: Request) -> dict[str, str]:
    """The url-encoded form body (first value of each field); no multipart needed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise Forbidden("form too large")
    buf = bytearray()
    async for piece in request.stream():  # counted as it arrives, never buffered past the limit
        buf += piece
        if len(buf) > MAX_FORM_BYTES:
            raise Forbidden("form too large")
    body = bytes(buf)
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


FormDep = Annotated[dict[str, str], Depends(form_data)]


def same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.url.scheme}://{request.url.netloc}"


def check_post(request: Request, user: UiUser, form: dict[str, str], role: Role) -> None:
    """CSRF, Origin and role checks every state-changing dashboard POST passes."""
    if not same_origin(request):
        raise Forbidden("cross-site request refused (Origin does not match this server)")
    if not hmac.compare_digest(form.get("csrf", ""), user.csrf):
        raise Forbidden("missing or invalid CSRF token: reload the page and try again")
    if not user.role.allows(role):
        raise Forbidden(f"role {user.role.value!r} may not do this; it needs {role.value!r}")
