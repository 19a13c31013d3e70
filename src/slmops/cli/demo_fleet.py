"""The fleet half of `slmops demo`: a control plane, three agents, two rollouts, one chat.

Everything is real and local: `slmops server run` on SQLite, three `slmops agent` processes
with different RAM budgets (so each resolves a different variant of the same bundle), the
signed bundle pushed to the server's registry, a blueprint applied, and a staged rollout (a
canary wave of one device, then the rest) followed to success. Then a deliberately broken
version (every weights file truncated after bundling inputs were copied: the signature is valid,
the model cannot load) is rolled out: the canary's health check fails, the gate rolls the
rollout back, and the canary returns to the kept version. Then one agent answers a chat
completion on its OpenAI-compatible endpoint, telemetry and a metric gate are shown, and two
sites get their own LoRA adapters (cli/demo_adapters.py).

Processes are children of the demo and die with it (``die_with_parent``); ``--keep-running``
leaves them up until Ctrl-C so the URLs printed can be tried.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from slmops.cli._output import out_console
from slmops.core.atomic import atomic_open
from slmops.core.errors import CheckFailedError, ToolError
from slmops.core.process import die_with_parent

CLI = [sys.executable, "-m", "slmops.cli.main"]
BLUEPRINT = "demo-assistant"
BROKEN_VERSION = "1.1.0"
WINDOW_SECONDS = 10  # telemetry windows: short, so the demo shows field data within seconds
WEIGHT_SUFFIXES = (".gguf", ".onnx", ".onnx.data")


@dataclass(frozen=True)
class AgentSpec:
    device_id: str
    profile: str | None
    model_ram_mb: int
    site: str


def plan_agents(bundle: Path) -> tuple[AgentSpec, ...]:
    """Three devices whose RAM budgets make them resolve different variants of ``bundle``.

    The budgets come from the bundle's own measured RAM per variant (peak RSS of the evaluation,
    which varies by machine), not from constants: the gateway gives the model just enough for
    its profile's pick; the Pi (same pick) a little less, so it falls back to the best variant
    that still fits; the mini PC, with no profile, gives plenty and gets the best quality.
    """
    from slmops.bundle.inspect import inspect_bundle
    from slmops.protocol.bundle import VariantDescriptor
    from slmops.server.resolve import ram_needed

    descriptors = [
        VariantDescriptor.model_validate(v["descriptor"])
        for v in inspect_bundle(bundle)["variants"]
        if v.get("descriptor")
    ]
    mib = 2**20
    needs = sorted(ram_needed(d) for d in descriptors)
    pick = next((d for d in descriptors if "arm-gateway-2gb" in d.selected_for), None)
    pick_need = ram_needed(pick) if pick else needs[0]
    below = [n for n in needs if n < pick_need]
    pi_budget = max(below) if below else pick_need
    return (
        AgentSpec("gateway-1", "arm-gateway-2gb", -(-pick_need // mib) + 1, "store-1"),
        AgentSpec("pi-1", "rpi5-8gb", -(-pi_budget // mib), "store-2"),
        AgentSpec("minipc-1", None, max(1024, -(-needs[-1] // mib) + 64), "store-3"),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Fleet:
    """The processes and credentials of one demo run."""

    root: Path
    url: str = ""
    admin: str = ""
    agents: tuple[AgentSpec, ...] = ()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    agent_ports: dict[str, int] = field(default_factory=dict)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=60,
        )
        if r.status_code >= 400:
            raise ToolError(f"{method} {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else None

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=die_with_parent,
        )
        log.close()
        self.procs.append((name, proc))

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise ToolError(
                    f"{name} exited with code {proc.returncode}",
                    where=self.root / f"{name}.log",
                    hint="its log says why",
                )


@contextmanager
def fleet_processes(root: Path, keep_running: bool) -> Iterator[Fleet]:
    fleet = Fleet(root)
    try:
        yield fleet
        if keep_running:
            out_console.print("[bold]--keep-running:[/] press Ctrl-C to stop the server and agents")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        fleet.stop()


def _wait_until(what: str, check: Any, timeout: float, fleet: Fleet) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check_alive()
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.3)
    raise ToolError(f"timed out after {timeout:g} s waiting for {what}", where=fleet.root)


def start_server(fleet: Fleet) -> None:
    data = fleet.root / "server"
    data.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        [*CLI, "server", "token", "create", "--data", str(data), "--role", "admin", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        raise ToolError("cannot create the admin token", where=data, hint=made.stderr[-500:])
    fleet.admin = json.loads(made.stdout)["token"]
    port = free_port()
    fleet.url = f"http://127.0.0.1:{port}"
    env = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.5", "SLMOPS_POLL_SECONDS": "1"}
    fleet.spawn("server", [*CLI, "server", "run", "--data", str(data), "--port", str(port)], env)
    _wait_until(
        "the control plane",
        lambda: httpx.get(fleet.url + "/healthz", timeout=2).is_success,
        60,
        fleet,
    )


def start_agents(
    fleet: Fleet, public_key: Path, specs: tuple[AgentSpec, ...], labels: dict[str, str]
) -> None:
    """Enroll and start ``specs`` with an enrollment token scoped to ``labels``."""
    made = fleet.api("POST", "/api/v1/enrollment-tokens", {"labels": labels})
    for spec in specs:
        port = free_port()
        fleet.agent_ports[spec.device_id] = port
        args = [
            *CLI,
            "agent",
            "--server",
            fleet.url,
            "--enroll-token",
            made["token"],
            "--data",
            str(fleet.root / "agents" / spec.device_id),
            "--device-id",
            spec.device_id,
            "--labels",
            f"site={spec.site}",
            "--model-ram-mb",
            str(spec.model_ram_mb),
            "--model-cores",
            "1",
            "--threads",
            "1",
            "--api-port",
            str(port),
            "--trusted-key",
            str(public_key),
            "--poll-seconds",
            "1",
        ]
        if spec.profile:
            args += ["--profile", spec.profile]
        fleet.spawn(f"agent-{spec.device_id}", args)

    def enrolled() -> bool:
        listed = fleet.api("GET", "/api/v1/devices")["data"]
        want = {a.device_id for a in specs}
        return len({d["device_id"] for d in listed} & want) == len(want)

    _wait_until(f"{len(specs)} agents to enroll", enrolled, 60, fleet)


def blueprint(
    model: str,
    version: str,
    *,
    name: str = BLUEPRINT,
    selector: dict[str, str] | None = None,
    rollout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "slmops/v1",
        "kind": "Blueprint",
        "metadata": {"name": name},
        "spec": {
            "selector": selector or {"fleet": "demo"},
            "model": {"name": model, "version": version},
            "generation": {"temperature": 0.0, "max_tokens": 32},
            "telemetry": {"window_seconds": WINDOW_SECONDS},
            "rollout": rollout
            or {
                "waves": [{"count": 1}, {"percent": 100}],
                "gates": {
                    "min_soak_seconds": 3,
                    "timeout_seconds": 300,
                    "min_reported": 1.0,
                    "on_failure": "rollback",
                },
            },
        },
    }


def apply_and_wait(
    fleet: Fleet, model: str, version: str, as_json: bool, doc: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Apply the blueprint (``doc``, or the demo's) and follow its rollout until it ends."""
    from slmops.cli.rollout import print_rollout, wait_for

    doc = doc or blueprint(model, version)
    name = doc["metadata"]["name"]
    applied = fleet.api("PUT", f"/api/v1/blueprints/{name}", doc)
    rid = applied["rollout"]
    if rid is None:
        raise ToolError(f"applying {model}:{version} created no rollout", where=fleet.url)
    if not as_json:
        out_console.print(f"blueprint/{name} -> {model}:{version}: rollout [bold]{rid}[/]")
    try:
        result = wait_for(fleet.url, fleet.admin, rid, timeout=300, quiet=as_json, interval=0.5)
    except CheckFailedError:
        result = fleet.api("GET", f"/api/v1/rollouts/{rid}")
        if result["status"] == "rolling-back":  # wait until the canary reports its revert
            result = _wait_until(
                f"{rid} to finish rolling back",
                lambda: (
                    (r := fleet.api("GET", f"/api/v1/rollouts/{rid}"))["status"] != "rolling-back"
                    and r
                ),
                120,
                fleet,
            )
    if not as_json:
        print_rollout(result)
    return dict(result)


def devices_table(fleet: Fleet) -> list[dict[str, Any]]:
    rows = []
    for d in fleet.api("GET", "/api/v1/devices")["data"]:
        active = d.get("active") or {}
        inv = d.get("inventory") or {}
        rows.append(
            {
                "device_id": d["device_id"],
                "profile": d.get("profile"),
                "model_ram_mb": (inv.get("model_ram_bytes") or 0) // 2**20,
                "version": active.get("version"),
                "variant": active.get("variant"),
            }
        )
    return rows


def print_devices(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table("device", "profile", "RAM for the model", "running", "variant")
    for r in rows:
        table.add_row(
            r["device_id"],
            r["profile"] or "-",
            f"{r['model_ram_mb']} MiB",
            r["version"] or "-",
            r["variant"] or "-",
        )
    out_console.print(table)


def make_broken_bundle(workdir: Path, out: Path, private_key: Path, name: str) -> Path:
    """A signed bundle whose weights are truncated: valid digests, a model that cannot load.

    The variants are copied file by file (never hard-linked) before truncating, so the real
    variants of the demo are untouched.
    """
    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import sign_bundle
    from slmops.core.digest import tree_digest
    from slmops.model.card import CARD_FILE, read_card

    src, dst = workdir / "variants", out.parent / "broken-variants"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=shutil.copy2, ignore=shutil.ignore_patterns(".*"))
    for path in dst.rglob("*"):
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            size = path.stat().st_size
            with path.open("r+b") as fh:
                fh.truncate(max(64, size // 2))
    for card_path in dst.rglob(CARD_FILE):  # the cards describe the truncated files honestly
        card = read_card(card_path.parent)
        if card is not None:
            card.model_copy(update={"digest": tree_digest(card_path.parent)}).write(
                card_path.parent
            )
    shutil.rmtree(out, ignore_errors=True)
    # no evaluation report: `build_bundle` rightly refuses variants whose files differ from the
    # evaluated ones, so the broken version ships without measurements (resolution then goes by
    # disk size, and every device still gets a variant of it)
    built = build_bundle(dst, None, name=name, version=BROKEN_VERSION, out=out)
    sign_bundle(built.path, private_key)
    return built.path


def chat(fleet: Fleet, device_id: str) -> dict[str, Any]:
    port = fleet.agent_ports[device_id]
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Return the list of"}],
        "max_tokens": 24,
    }
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
    if r.status_code != 200:
        raise ToolError(f"chat completion on {device_id}: HTTP {r.status_code}: {r.text[:300]}")
    doc: dict[str, Any] = r.json()
    return doc


def run_fleet_demo(
    workdir: Path, bundled: dict[str, str], *, model: Path, keep_running: bool, as_json: bool
) -> dict[str, Any]:
    """Server, agents, rollout of the good version, rollout of a broken one, one chat."""
    from slmops.bundle.registry import push

    root = workdir / "fleet"
    shutil.rmtree(root, ignore_errors=True)  # a fresh fleet each run: enrollment is per server
    root.mkdir(parents=True)
    name, version = bundled["name"], bundled["version"]
    keys = workdir / "keys"
    summary: dict[str, Any] = {}
    with fleet_processes(root, keep_running) as fleet:
        start_server(fleet)
        if not as_json:
            out_console.print(f"control plane [bold]{fleet.url}[/] (SQLite in {root / 'server'})")
        address = fleet.url.removeprefix("http://")
        push(Path(bundled["path"]), f"oci://{address}/{name}:{version}", token=fleet.admin)
        fleet.agents = plan_agents(Path(bundled["path"]))
        start_agents(fleet, keys / "slmops.pub", fleet.agents, {"fleet": "demo"})
        if not as_json:
            out_console.print(
                f"pushed {name}:{version}; enrolled "
                + ", ".join(
                    f"{a.device_id} ({a.model_ram_mb} MiB for the model)" for a in fleet.agents
                )
            )
            out_console.rule(f"[bold]6. staged rollout of {name}:{version}[/]")
        good = apply_and_wait(fleet, name, version, as_json)
        placed = devices_table(fleet)
        if not as_json:
            print_devices(placed)
        if good["status"] != "succeeded":
            raise CheckFailedError(
                f"the rollout of {name}:{version} ended {good['status']}",
                where=root,
                hint="see the agents' logs there",
            )
        if not as_json:
            out_console.rule(f"[bold]7. rollout of a broken {name}:{BROKEN_VERSION}[/]")
        broken = make_broken_bundle(workdir, root / "broken-bundle", keys / "slmops.key", name)
        push(broken, f"oci://{address}/{name}:{BROKEN_VERSION}", token=fleet.admin)
        bad = apply_and_wait(fleet, name, BROKEN_VERSION, as_json)
        after = devices_table(fleet)
        if not as_json:
            print_devices(after)
        if bad["status"] != "rolled-back" or any(r["version"] != version for r in after):
            raise CheckFailedError(
                f"the broken rollout ended {bad['status']} and devices run "
                f"{sorted({str(r['version']) for r in after})}",
                where=root,
            )
        if not as_json:
            out_console.rule("[bold]8. chat with an agent[/]")
        first = fleet.agents[0].device_id
        answer = chat(fleet, first)
        if not as_json:
            text = answer["choices"][0]["message"]["content"]
            port = fleet.agent_ports[first]
            out_console.print(
                f"POST http://127.0.0.1:{port}/v1/chat/completions ({first}, "
                f"{answer['model']}):\n  [italic]{text.strip()!r}[/]"
            )
        from slmops.cli.demo_telemetry import metric_gate_demo, show_telemetry

        if not as_json:
            out_console.rule("[bold]9. telemetry from the field[/]")
        telemetry = show_telemetry(fleet, as_json)
        if not as_json:
            out_console.rule("[bold]10. a healthy but slower canary, stopped by a metric gate[/]")
        gated = metric_gate_demo(
            fleet, model=model, name=name, version=version, keys=keys, as_json=as_json
        )
        from slmops.cli.demo_adapters import run_adapter_demo

        if not as_json:
            out_console.rule("[bold]11. per-site LoRA adapters: site=north and site=south[/]")
        adapters = run_adapter_demo(fleet, model=model, bundled=bundled, keys=keys, as_json=as_json)
        token_file = root / "admin-token"
        with atomic_open(token_file, mode=0o600) as fh:
            fh.write(fleet.admin.encode() + b"\n")
        if not as_json:
            out_console.rule("[bold]12. dashboard[/]")
            out_console.print(
                f"dashboard [bold]{fleet.url}/ui/[/] (log in with the token in {token_file}); "
                f"Prometheus metrics at {fleet.url}/metrics; logs in {root}"
            )
            if keep_running:
                out_console.print(
                    f"try: [bold]slmops rollout list --server {fleet.url} "
                    f"--token $(cat {token_file})[/]"
                )
            else:
                out_console.print("run with --keep-running to keep the server and agents up")
        summary = {
            "server": fleet.url,
            "dashboard": f"{fleet.url}/ui/",
            "rollout": good,
            "devices": placed,
            "broken_rollout": bad,
            "devices_after_broken": after,
            "chat": answer,
            "telemetry": telemetry,
            "metric_gate": gated,
            "adapters": adapters,
        }
    return summary
