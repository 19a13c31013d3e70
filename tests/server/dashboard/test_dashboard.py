"""The dashboard end to end: a real `slmops server run`, a real bundle pushed to its registry,
devices enrolled over the device API, a blueprint applied (so a rollout runs), and Debian's
Chromium driven by Playwright (headless, never a downloaded browser).

If Chromium cannot be launched, these tests fail: they are not skipped.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from factories.blueprints import FITS, MODEL, push_version
from factories.server import Server, _server, credential, enrollment_token, inventory, make_token

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLEET = "dash"
DEVICES = [f"{FLEET}-{i}" for i in range(3)]
RID = f"{FLEET}-1"
ZERO = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with version 1.0.0 on channel ``stable``, 3 devices, a rollout in wave 2."""
    for srv in _server(tmp_path_factory, env={"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"}):
        push_version(srv, tmp_path_factory.mktemp("bundle"), "1.0.0")
        with srv.client(srv.admin) as c:
            r = c.put(f"/api/v1/models/{MODEL}/channels/stable", json={"version": "1.0.0"})
            assert r.status_code == 200, r.text
        token = enrollment_token(srv, {"fleet": FLEET})
        creds = {d: credential(srv, token, d, **FITS) for d in DEVICES}
        for cred in creds.values():
            _checkin(srv, cred)
        _apply(srv)
        doc = _rollout(srv)
        [canary] = [d["device_id"] for d in doc["device_list"] if d["wave"] == 0]
        _checkin(srv, creds[canary], [{"rollout_id": RID, "version": "1.0.0", "state": "active"}])
        _until(srv, lambda d: d["wave"] == 1 and d["wave_list"][0]["decision"] is not None)
        yield srv


def _checkin(srv: Server, cred: str, actions: list[dict[str, Any]] | None = None) -> None:
    """Check in; reporting ``active`` also makes it run that version (as the agent would)."""
    body: dict[str, Any] = {"inventory": inventory(**FITS)}
    if actions:
        body["actions"] = actions
        version = actions[-1]["version"]
        body["active"] = {"name": MODEL, "version": version, "variant": "q8", "digest": ZERO}
    r = httpx.post(
        srv.url + "/device/v1/checkin",
        json=body,
        headers={"Authorization": f"Bearer {cred}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text


def _apply(srv: Server) -> None:
    doc = {
        "apiVersion": "slmops/v1",
        "kind": "Blueprint",
        "metadata": {"name": FLEET},
        "spec": {
            "selector": {"fleet": FLEET},
            "model": {"name": MODEL, "version": "1.0.0"},
            "rollout": {
                "waves": [{"count": 1}, {"percent": 100}],
                "gates": {
                    "min_soak_seconds": 0,
                    "timeout_seconds": 600,
                    "min_reported": 1,
                    "min_success_rate": 1,
                },
            },
        },
    }
    with srv.client(srv.admin) as c:
        r = c.put(f"/api/v1/blueprints/{FLEET}", json=doc)
    assert r.status_code == 200, r.text
    assert r.json()["rollout"] == RID


def _rollout(srv: Server) -> dict[str, Any]:
    with srv.client(srv.admin) as c:
        r = c.get(f"/api/v1/rollouts/{RID}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _until(srv: Server, ok: Any, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = _rollout(srv)
        if ok(doc):
            return doc
        assert time.monotonic() < deadline, f"gave up waiting: {doc}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Debian's Chromium; a launch failure is an error, never a skip."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A fresh browser context; every request it makes must go to the test server."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    urls: list[str] = []
    context.on("request", lambda req: urls.append(req.url))
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()
    assert urls, "the browser made no request at all"
    outside = [u for u in urls if urlsplit(u).hostname != "127.0.0.1"]
    assert not outside, f"requests left the machine: {outside}"


def login(page: Page, server: Server, token: str, path: str = "/ui/") -> None:
    page.goto(server.url + path)
    expect(page).to_have_url(f"{server.url}/ui/login?next={path}")
    page.fill("#token", token)
    page.click("form[action='/ui/login'] button")
    expect(page).to_have_url(server.url + path)


def shot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    shutil.copy(path, f"/tmp/dashboard-{name}.png")
    return path


# --- tests -------------------------------------------------------------------------------------


def test_operator_sees_fleet_and_rollout_and_pauses_it(
    page: Page, server: Server, tmp_path: Path
) -> None:
    login(page, server, make_token(server, "operator"))
    devices = page.get_by_test_id("devices")
    for device_id in DEVICES:
        expect(devices).to_contain_text(device_id)
    expect(page.get_by_test_id("count-devices")).to_have_text(str(len(DEVICES)))
    expect(page.get_by_test_id("rollouts")).to_contain_text(RID)
    expect(page.locator("svg.chart").first).to_contain_text(str(FITS["profile"]))
    assert shot(page, tmp_path, "fleet").stat().st_size > 10_000

    page.get_by_role("link", name=RID).first.click()
    expect(page).to_have_url(f"{server.url}/ui/rollouts/{RID}")
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")
    doc = _rollout(server)
    assert doc["status"] == "running" and doc["wave"] == 1
    expect(page.locator("[data-testid^=wave-]")).to_have_count(len(doc["wave_list"]))
    gates = page.get_by_test_id("gates-0")
    results = doc["wave_list"][0]["decision"]["results"]
    assert results
    for g in results:
        row = gates.locator(f"tr[data-gate='{g['gate']}']")
        expect(row).to_contain_text(g["status"])
        for key in ("observed", "threshold"):
            if g[key] is not None:
                value = g[key]
                text = str(int(value)) if float(value).is_integer() else f"{value:.4g}"
                expect(row).to_contain_text(text)
    expect(page.get_by_test_id("wave-0").locator("svg.wave-bars")).to_contain_text("active")
    expect(page.get_by_test_id("rollout-devices")).to_contain_text(DEVICES[0])
    expect(page.get_by_test_id("history")).to_contain_text("running")
    assert shot(page, tmp_path, "rollout").stat().st_size > 10_000

    actions = page.get_by_test_id("actions")
    for action in ("pause", "promote", "abort", "rollback"):
        expect(actions.locator(f"button[data-action={action}]")).to_be_visible()
    expect(actions.locator("button[data-action=resume]")).to_have_count(0)
    page.fill("input[name=reason]", "checking the canary")
    actions.locator("button[data-action=pause]").click()
    expect(page.get_by_test_id("rollout-status")).to_have_text("paused")
    expect(page.get_by_role("status")).to_contain_text("pause: done")
    doc = _rollout(server)
    assert doc["status"] == "paused"
    assert doc["history"][-1]["reason"].endswith("checking the canary")
    assert doc["history"][-1]["actor"] == "t-operator"

    # A command the state no longer allows (forged: the button is gone) shows the API's reason.
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    assert csrf
    r = page.request.post(f"{server.url}/ui/rollouts/{RID}/pause", form={"csrf": csrf})
    assert r.ok and "paused" in r.text()  # followed the redirect to the page with the error

    actions.locator("button[data-action=resume]").click()
    expect(page.get_by_test_id("rollout-status")).to_have_text("running")
    assert _rollout(server)["status"] == "running"

    page.click("header form.logout button")
    expect(page).to_have_url(f"{server.url}/ui/login?msg=logged%20out")
    page.goto(server.url + f"/ui/rollouts/{RID}")
    expect(page).to_have_url(f"{server.url}/ui/login?next=/ui/rollouts/{RID}")


def test_viewer_sees_no_actions_and_a_forged_post_is_refused(page: Page, server: Server) -> None:
    before = _rollout(server)["status"]
    login(page, server, make_token(server, "viewer"), f"/ui/rollouts/{RID}")
    expect(page.get_by_test_id("gates-0")).to_be_visible()
    expect(page.get_by_test_id("actions")).to_have_count(0)
    expect(page.locator("button[data-action]")).to_have_count(0)
    expect(page.get_by_text("read-only")).to_be_visible()

    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    assert csrf
    for action in ("pause", "abort"):
        r = page.request.post(
            f"{server.url}/ui/rollouts/{RID}/{action}", form={"csrf": csrf}, max_redirects=0
        )
        assert r.status == 403, r.text()
        assert "viewer" in r.text()
    assert _rollout(server)["status"] == before


def test_csrf_origin_and_cookie_rules(server: Server) -> None:
    operator = make_token(server, "operator")
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.get("/")
        assert (r.status_code, r.headers["location"]) == (307, "/ui/")
        r = c.get("/ui/rollouts")
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login?next=/ui/rollouts")
        r = c.post(f"/ui/rollouts/{RID}/pause", data={"csrf": "x"})
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")

        r = c.post("/ui/login", data={"token": operator, "next": "https://evil.example/"})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/")
        cookie = r.headers["set-cookie"].lower()
        for part in ("slmops_ui=", "httponly", "samesite=strict", "path=/ui"):
            assert part in cookie, cookie
        r = c.post(f"/ui/rollouts/{RID}/pause", data={})  # logged in, but no CSRF token
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post(f"/ui/rollouts/{RID}/pause", data={"csrf": "0" * 64})
        assert r.status_code == 403
        page = c.get(f"/ui/rollouts/{RID}").text
        csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
        r = c.post(
            f"/ui/rollouts/{RID}/pause",
            data={"csrf": csrf},
            headers={"Origin": "https://evil.example"},
        )
        assert r.status_code == 403 and "Origin" in r.text
    assert _rollout(server)["status"] == "running"


def test_bad_token_shows_an_error(page: Page, server: Server) -> None:
    page.goto(server.url + "/ui/")
    for bad in ("slmo_" + "x" * 40, "not-a-token"):
        page.fill("#token", bad)
        page.click("form[action='/ui/login'] button")
        expect(page.get_by_test_id("login-error")).to_contain_text("unknown, revoked or malformed")
        expect(page.locator("#token")).to_be_visible()
    page.goto(server.url + "/ui/")
    expect(page).to_have_url(f"{server.url}/ui/login?next=/ui/")


def test_device_models_and_telemetry_pages(page: Page, server: Server) -> None:
    login(page, server, make_token(server, "viewer"))
    page.get_by_role("link", name=DEVICES[0], exact=True).click()
    expect(page.locator("h1")).to_have_text(f"Device {DEVICES[0]}")
    expect(page.get_by_role("main")).to_contain_text("fleet=dash")
    expect(page.get_by_role("main")).to_contain_text("model_ram_bytes")  # inventory
    expect(page.get_by_role("main")).to_contain_text("Desired state")

    page.goto(server.url + "/ui/devices/no-such-device")
    expect(page.get_by_test_id("error")).to_contain_text("no device 'no-such-device'")

    page.get_by_role("link", name="Models").click()
    table = page.get_by_test_id(f"model-{MODEL}")
    expect(table).to_contain_text("1.0.0")
    expect(table).to_contain_text("stable")
    with page.expect_response(lambda r: "/charts/sha256:" in r.url) as chart:
        table.get_by_role("link", name="1.0.0").click()
    assert chart.value.status == 200
    assert chart.value.headers["content-type"] == "image/png"
    expect(page.get_by_test_id("variants")).to_contain_text("gguf")
    expect(page.get_by_test_id("chart")).to_have_count(1)
    expect(page.get_by_role("main")).to_contain_text("report.json")
    bogus = page.request.get(
        f"{server.url}/ui/models/{MODEL}/versions/1.0.0/charts/sha256:{'0' * 64}"
    )
    assert bogus.status == 404

    page.get_by_role("link", name="Telemetry").click()
    expect(page.locator("h1")).to_have_text("Telemetry")
    charts = page.locator("svg.chart")
    note = page.get_by_test_id("telemetry-note")
    expect(charts.or_(note).first).to_be_visible()
    if note.count():
        expect(note).to_contain_text("no telemetry yet")
