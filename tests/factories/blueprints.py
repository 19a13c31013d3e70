"""Blueprints as an operator writes them, and the one model (`assistant`) every server suite
pushes: fabricated variants through the real bundle builder, pushed to a running server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from factories.bundles import make_inputs
from factories.server import Server
from slmops.bundle.build import build_bundle
from slmops.bundle.registry import push

MAIN = [sys.executable, "-m", "slmops.cli.main"]
MODEL = "assistant"
FITS = {"runtimes": ["gguf"], "model_ram_bytes": 2 << 30, "profile": "pi"}
TOO_SMALL = {"runtimes": ["gguf"], "model_ram_bytes": 100 << 20, "profile": None}


def push_version(server: Server, root: Path, version: str, names: list[str] | None = None) -> str:
    variants, report = make_inputs(root / "in", names)
    built = build_bundle(variants, report, name=MODEL, version=version, out=root / "bundle")
    address = server.url.removeprefix("http://")
    push(built.path, f"oci://{address}/{MODEL}:{version}", token=server.admin)
    return built.digest


def apply(server: Server, path: Path, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAIN, "apply", "-f", str(path), "--server", server.url, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), "SLMOPS_TOKEN": token},
        check=False,
    )


def _env() -> dict[str, str]:
    """The test's environment without a token or server of the caller's leaking in."""
    return {k: v for k, v in os.environ.items() if k not in ("SLMOPS_TOKEN", "SLMOPS_SERVER")}


def blueprint(name: str, selector: dict[str, str], model: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "slmops/v1",
        "kind": "Blueprint",
        "metadata": {"name": name},
        "spec": {
            "selector": selector,
            "model": model,
            "generation": {"temperature": 0.2},
            "devices": {"bp-1": {"max_tokens": 64}},
            # one wave, no soak: every matching device is moved when the apply starts it
            "rollout": {"waves": [{"percent": 100}], "gates": {"min_soak_seconds": 0}},
        },
    }


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def check_in(server: Server, cred: str, inv: dict[str, Any], etag: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {cred}"}
    if etag:
        headers["If-None-Match"] = etag
    return httpx.post(
        server.url + "/device/v1/checkin", json={"inventory": inv}, headers=headers, timeout=10
    )
