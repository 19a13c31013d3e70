"""Which sites run which LoRA adapter: the dashboard's fleet and device pages and
`slmops devices list`, against a real `slmops server run` (plain HTTP, no browser).

Devices report their adapter in the check-in's ``active.adapter`` (what the agent actually
loaded); the pages and the CLI must show exactly that, grouped by the ``site`` label.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from html import unescape
from typing import Any

import httpx
import pytest

from factories.server import Server, _server, credential, enrollment_token, inventory, make_token

MAIN_CLI = [sys.executable, "-m", "slmops.cli.main"]
DIGEST = "sha256:" + "1" * 64
NORTH = {"name": "north-docs", "version": "1.0.0", "digest": "sha256:" + "a" * 64}
SOUTH = {"name": "south-docs", "version": "2.0.0", "digest": "sha256:" + "b" * 64}
# device id -> (site label, adapter it reports)
FLEET: dict[str, tuple[str | None, dict[str, str] | None]] = {
    "ad-n1": ("north", NORTH),
    "ad-n2": ("north", NORTH),
    "ad-s1": ("south", SOUTH),
    "ad-x": (None, None),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    for srv in _server(tmp_path_factory):
        token = enrollment_token(srv, {"fleet": "adapters"})
        for device_id, (site, adapter) in FLEET.items():
            labels = {"site": site} if site else {}
            cred = credential(srv, token, device_id, labels=labels)
            active: dict[str, Any] = {
                "name": "demo",
                "version": "1.0.0",
                "variant": "q8",
                "digest": DIGEST,
            }
            if adapter:
                active["adapter"] = adapter
            body = {"inventory": inventory(labels=labels), "active": active}
            r = httpx.post(
                srv.url + "/device/v1/checkin",
                json=body,
                headers={"Authorization": f"Bearer {cred}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
        yield srv


def _page(srv: Server, path: str) -> str:
    token = make_token(srv, "viewer")
    r = httpx.get(srv.url + path, cookies={"slmops_ui": token}, timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def _row(html: str, attr: str) -> str:
    m = re.search(rf"<tr {attr}>(.*?)</tr>", html, re.S)
    assert m, f"no row {attr} in the page"
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", m.group(1)))).strip()


def test_fleet_page_counts_devices_and_sites_per_adapter(server: Server) -> None:
    html = _page(server, "/ui/")
    assert 'data-testid="adapters"' in html
    assert _row(html, 'data-adapter="north-docs:1.0.0"') == "north-docs:1.0.0 2 site=north: 2"
    assert _row(html, 'data-adapter="south-docs:2.0.0"') == "south-docs:2.0.0 1 site=south: 1"
    assert _row(html, 'data-adapter="none"') == "none (base model alone) 1 site=-: 1"
    # the devices table has an adapter column, one cell per device
    for device_id, (_, adapter) in FLEET.items():
        cell = re.search(rf'data-testid="adapter-{device_id}">([^<]*)<', html)
        assert cell, device_id
        want = f"{adapter['name']}:{adapter['version']}" if adapter else "–"
        assert cell.group(1) == want


def test_device_page_shows_its_adapter(server: Server) -> None:
    html = _page(server, "/ui/devices/ad-s1")
    m = re.search(r'data-testid="adapter">(.*?)</p>', html, re.S)
    assert m
    text = re.sub(r"<[^>]+>", "", m.group(1))
    assert "south-docs:2.0.0" in text and SOUTH["digest"][:19] in text
    html = _page(server, "/ui/devices/ad-x")
    m = re.search(r'data-testid="adapter">(.*?)</p>', html, re.S)
    assert m and "none" in m.group(1) and "docs" not in m.group(1)


def test_devices_list_has_an_adapter_column(server: Server) -> None:
    env = {**os.environ, "SLMOPS_SERVER": server.url, "SLMOPS_TOKEN": make_token(server, "viewer")}
    res = subprocess.run(
        [*MAIN_CLI, "devices", "list", "--json"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr + res.stdout
    got = {d["device_id"]: d["adapter"] for d in json.loads(res.stdout)["data"]}
    assert got == {
        "ad-n1": "north-docs:1.0.0",
        "ad-n2": "north-docs:1.0.0",
        "ad-s1": "south-docs:2.0.0",
        "ad-x": None,
    }
    res = subprocess.run([*MAIN_CLI, "devices", "list"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr + res.stdout
    lines = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.strip()}
    assert lines["ad-s1"][1:4] == ["active", "adapter", "south-docs:2.0.0"]
    assert lines["ad-x"][1:4] == ["active", "adapter", "none"]
