"""The operator dashboard, served by the control plane under ``/ui/`` (issue 6).

Server-rendered Jinja2 pages over the same database and builders as the operator API; charts are
inline SVG drawn in Python (``svg.py``); CSS is a static file of this package, so the dashboard
works offline and no page loads anything from another host. Sessions and CSRF: see ``auth.py``.

Routes (all GET unless noted; every page needs a session, else 303 to the login page):

    /ui/login (GET, POST)      paste an operator API token; /ui/logout (POST)
    /ui/                       fleet overview: devices by profile, version, health; rollouts
    /ui/devices/{id}           inventory, labels, active/previous model, desired state, actions
    /ui/rollouts               rollouts list
    /ui/rollouts/{id}          waves (progress, gate numbers), devices, history, action buttons
    /ui/rollouts/{id}/{action} (POST, operator+) start|pause|resume|promote|abort|rollback
    /ui/models                 models, versions and their channels
    /ui/models/{name}/versions/{v}                version: variants, lineage, report charts
    /ui/models/{name}/versions/{v}/charts/{digest} a chart PNG of that version's bundle
    /ui/telemetry              per version and profile figures from telemetry ``summarize``
    /ui/static/...             CSS
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from slmops.server.dashboard import models_pages, pages
from slmops.server.dashboard.auth import COOKIE, COOKIE_PATH, Forbidden, LoginRequired, login_url
from slmops.server.dashboard.render import STATIC_DIR, render


async def _login_required(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, LoginRequired):  # registered for this type only
        raise exc
    resp = RedirectResponse(login_url(exc.next_path), status_code=303)
    if COOKIE in request.cookies:  # a stale or revoked token: drop it
        resp.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return resp


async def _forbidden(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, Forbidden):
        raise exc
    return render(request, "error.html", None, 403, message=exc.message)


def install(app: FastAPI) -> None:
    """Mount the dashboard on ``app``: pages, static files, and ``/`` redirecting to ``/ui/``."""
    app.include_router(pages.router)
    app.include_router(models_pages.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(Forbidden, _forbidden)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)


__all__ = ["install"]
