"""Dashboard pages for the fleet: login/logout, overview, devices, rollouts (and their actions).

Reads reuse the operator API's own builders (``DevicePublic.of``, rollout ``summary``/``detail``)
so a page shows what the API returns; rollout actions run the same ``run_event`` path as
``POST /api/v1/rollouts/{id}/{action}``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from slmops.server.api.deps import ServicesDep, SessionDep, SettingsDep
from slmops.server.api.operator.devices import DevicePublic
from slmops.server.dashboard.adapters_panel import adapter_of, adapter_rows
from slmops.server.dashboard.auth import (
    COOKIE,
    COOKIE_PATH,
    MAX_AGE,
    FormDep,
    UserDep,
    check_post,
    check_token,
    safe_next,
    same_origin,
)
from slmops.server.dashboard.render import render
from slmops.server.dashboard.svg import bar_chart, wave_bars
from slmops.server.db.models import Device, DeviceAction, as_utc
from slmops.server.rollouts.machine import (
    InvalidTransition,
    OperatorAction,
    OperatorCommand,
    RolloutState,
)
from slmops.server.rollouts.machine.machine import ALLOWED
from slmops.server.rollouts.routes import CURSOR, detail, summary
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.tables import Rollout
from slmops.server.security import Role

router = APIRouter(prefix="/ui", include_in_schema=False)
STALE_POLLS = 3
ACTION_ORDER = (
    OperatorAction.START,
    OperatorAction.PAUSE,
    OperatorAction.RESUME,
    OperatorAction.PROMOTE,
    OperatorAction.ABORT,
    OperatorAction.ROLLBACK,
)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


# --- login -------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    return render(request, "login.html", None, next=safe_next(next), error=None)


@router.post("/login")
def login(request: Request, session: SessionDep, form: FormDep) -> Response:
    next_path = safe_next(form.get("next"))
    if not same_origin(request):
        return render(request, "login.html", None, 403, next=next_path, error="cross-site login")
    secret = form.get("token", "").strip()
    if check_token(session, secret) is None:
        error = "unknown, revoked or malformed API token (it starts with slmo_)"
        return render(request, "login.html", None, 401, next=next_path, error=error)
    resp = _redirect(next_path)
    resp.set_cookie(
        COOKIE,
        secret,
        max_age=MAX_AGE,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return resp


@router.post("/logout")
def logout(request: Request, user: UserDep, form: FormDep) -> Response:
    check_post(request, user, form, Role.VIEWER)
    resp = _redirect("/ui/login?msg=" + quote("logged out"))
    resp.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return resp


# --- fleet -------------------------------------------------------------------------------------


def health(last_seen_age: float | None, poll_seconds: float) -> str:
    if last_seen_age is None:
        return "never"
    return "stale" if last_seen_age > STALE_POLLS * poll_seconds else "ok"


@router.get("/", response_class=HTMLResponse)
def fleet(request: Request, user: UserDep, session: SessionDep, settings: SettingsDep) -> Response:
    now = time.time()
    rows: list[dict[str, Any]] = []
    for d in session.scalars(select(Device).order_by(Device.device_id)):
        seen_age = now - as_utc(d.last_seen).timestamp() if d.last_seen else None
        rows.append(
            {
                "device_id": d.device_id,
                "profile": d.profile or "unknown",
                "version": (d.active or {}).get("version") or "none",
                "model": (d.active or {}).get("name"),
                "adapter": adapter_of(d.active),
                "last_seen": d.last_seen,
                "age": seen_age,
                "health": health(seen_age, settings.poll_seconds),
                "labels": d.effective_labels,
            }
        )
    by_profile = Counter(r["profile"] for r in rows)
    by_version = Counter(r["version"] for r in rows)
    by_health = Counter(r["health"] for r in rows)
    active = []
    for row in session.scalars(select(Rollout).order_by(Rollout.created_at.desc()).limit(200)):
        state = RolloutState.from_json(row.state_json)
        if not state.status.is_terminal:
            active.append(summary(row, state))
    return render(
        request,
        "fleet.html",
        user,
        devices=rows,
        by_health=by_health,
        stale_after=STALE_POLLS * settings.poll_seconds,
        profile_chart=bar_chart("devices by profile", sorted(by_profile.items()), "devices"),
        version_chart=bar_chart("devices by version", sorted(by_version.items()), "devices"),
        rollouts=active,
        adapters=adapter_rows((r["adapter"], r["labels"]) for r in rows),
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(
    device_id: str, request: Request, user: UserDep, session: SessionDep, settings: SettingsDep
) -> Response:
    row = session.scalar(select(Device).where(Device.device_id == device_id))
    if row is None:
        return render(request, "error.html", user, 404, message=f"no device {device_id!r}")
    actions = list(
        session.scalars(
            select(DeviceAction)
            .where(DeviceAction.device_id == device_id)
            .order_by(DeviceAction.updated_at.desc())
            .limit(50)
        )
    )
    dev = DevicePublic.of(row, actions)
    seen_age = time.time() - dev.last_seen.timestamp() if dev.last_seen else None
    return render(
        request,
        "device.html",
        user,
        d=dev,
        age=seen_age,
        health=health(seen_age, settings.poll_seconds),
    )


# --- rollouts ----------------------------------------------------------------------------------


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(request: Request, user: UserDep, session: SessionDep) -> Response:
    query = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.seq.desc()).limit(500)
    data = [summary(r, RolloutState.from_json(r.state_json)) for r in session.scalars(query)]
    return render(request, "rollouts.html", user, rollouts=data)


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(
    rollout_id: str, request: Request, user: UserDep, session: SessionDep, after: str | None = None
) -> Response:
    """Counts and waves from the tally; devices one page at a time (``?after=`` the cursor)."""
    row = session.get(Rollout, rollout_id)
    if row is None:
        return render(request, "error.html", user, 404, message=f"no rollout {rollout_id!r}")
    doc = detail(row, after=after if after and re.fullmatch(CURSOR, after) else None)
    status = RolloutState.from_json(row.state_json).status
    waves = []
    moved = active = 0
    for w in doc.wave_list:  # cumulative: devices moved by the end of each wave
        moved += w.devices
        active += w.succeeded
        waves.append(
            {
                "w": w,
                "moved": moved,
                "active": active,
                "bars": wave_bars(doc.devices, w.target, moved, active),
                "gate": w.decision or w.evaluation,
            }
        )
    actions = [a.value for a in ACTION_ORDER if status in ALLOWED[a]]
    return render(request, "rollout.html", user, r=doc, waves=waves, actions=actions)


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(
    rollout_id: str,
    action: OperatorAction,
    request: Request,
    user: UserDep,
    form: FormDep,
    session: SessionDep,
    services: ServicesDep,
) -> Response:
    check_post(request, user, form, Role.OPERATOR)
    page = f"/ui/rollouts/{quote(rollout_id)}"
    if session.get(Rollout, rollout_id) is None:
        return render(request, "error.html", user, 404, message=f"no rollout {rollout_id!r}")
    wave_text = form.get("wave", "")
    command = OperatorCommand(
        action=action,
        actor=user.name,
        reason=(form.get("reason") or "").strip()[:500] or "from the dashboard",
        wave=int(wave_text) if wave_text.isdigit() else None,
    )
    try:
        run_event(session, rollout_id, command, services.context())
    except InvalidTransition as exc:
        return _redirect(f"{page}?err={quote(exc.message)}")
    return _redirect(f"{page}?msg={quote(f'{action.value}: done')}")
