"""The telemetry half of `slmops demo`: field data arriving, and a metric gate stopping a canary.

Traffic is driven at the agents' OpenAI endpoints; their windows (10 s in the demo blueprint)
reach the control plane, and the demo prints what the operator API aggregates per version and
profile. Then three "kiosk" agents of one hardware class run 1.0.0, and version 1.2.0 is rolled
out to them: a real, healthy build of the same model exported as fp32 GGUF (no quantization,
no pruning), so each token reads about seven times the weights of the 1.0.0 variant they run.
Its health check passes; its latency and decode speed, compared by the rollout's metric gates
with the two kiosks still on 1.0.0 (the baseline cohort of the same class), do not, and the
rollout rolls the canary back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from slmops.cli._output import out_console
from slmops.cli.demo_fleet import (
    AgentSpec,
    Fleet,
    _wait_until,
    apply_and_wait,
    blueprint,
    devices_table,
    print_devices,
    start_agents,
)
from slmops.core.errors import CheckFailedError

SLOW_VERSION = "1.2.0"
KIOSKS = tuple(AgentSpec(f"kiosk-{i}", "x86-minipc-16gb", 1024, "mall") for i in (1, 2, 3))
KIOSK_SELECTOR = {"fleet": "kiosks"}
PROMPTS = ("Return the list of", "Create a new", "The default value is", "Raise an error if")


@contextmanager
def traffic(fleet: Fleet, device_ids: list[str], *, max_tokens: int = 24) -> Iterator[list[int]]:
    """Send chat completions round-robin to ``device_ids`` from two threads until the block
    ends; yields [served, failed] counters."""
    stop = threading.Event()
    counts = [0, 0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = k
            while not stop.is_set():
                device = device_ids[i % len(device_ids)]
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 2
                body = {
                    "model": "default",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                }
                port = fleet.agent_ports[device]
                try:
                    r = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    counts[0 if ok else 1] += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    try:
        yield counts
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=70)


def summary(fleet: Fleet, *group_by: str) -> list[dict[str, Any]]:
    query = "&".join(f"group_by={g}" for g in group_by)
    rows: list[dict[str, Any]] = fleet.api("GET", f"/api/v1/telemetry?{query}")["data"]
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(
        "version", "profile", "devices", "requests", "errors", "p95 latency", "tok/s", "logprob"
    )
    for r in rows:
        if not r.get("version"):
            continue
        p95 = r.get("latency_p95_ms")
        tps = r.get("tokens_per_s")
        lp = r.get("logprob_mean")
        table.add_row(
            str(r["version"]),
            str(r.get("profile") or "-"),
            str(r["devices"]),
            f"{r['requests']:.0f}",
            f"{r['errors']:.0f}",
            f"{p95:.0f} ms" if p95 is not None else "-",
            f"{tps:.0f}" if tps is not None else "-",
            f"{lp:.2f}" if lp is not None else "-",
        )
    out_console.print(table)


def show_telemetry(fleet: Fleet, as_json: bool) -> list[dict[str, Any]]:
    """Drive traffic at the demo agents until their windows reach the server."""
    ids = [a.device_id for a in fleet.agents]
    with traffic(fleet, ids) as counts:

        def arrived() -> list[dict[str, Any]] | None:
            per_device = {r["device_id"]: r["requests"] for r in summary(fleet, "device_id")}
            if any(per_device.get(d, 0) < 5 for d in ids):
                return None  # until every agent's windows have come in
            return [r for r in summary(fleet, "version", "profile") if r.get("version")]

        rows: list[dict[str, Any]] = _wait_until("telemetry to arrive", arrived, 90, fleet)
    if not as_json:
        out_console.print(
            f"{counts[0]} chat completions served ({counts[1]} failed); telemetry windows of "
            "10 s arrive per device as aggregates (no prompt or response text):"
        )
        print_summary(rows)
    return rows


def kiosks_for(slow: Path) -> tuple[AgentSpec, ...]:
    """The kiosks, giving the model room for the slower bundle's fp32 variant (measured RAM
    from its descriptor, at least ``KIOSKS``' 1 GiB): a real model's fp32 GGUF (Gemma 3 270M:
    1.3 GiB) would not fit 1 GiB, and the gate could not judge a canary that cannot be placed."""
    from slmops.bundle.inspect import inspect_bundle
    from slmops.protocol.bundle import VariantDescriptor
    from slmops.server.resolve import ram_needed

    needs = [
        ram_needed(VariantDescriptor.model_validate(v["descriptor"]))
        for v in inspect_bundle(slow)["variants"]
        if v.get("descriptor")
    ]
    mib = max([k.model_ram_mb for k in KIOSKS] + [-(-n // 2**20) + 64 for n in needs])
    return tuple(AgentSpec(k.device_id, k.profile, mib, k.site) for k in KIOSKS)


def make_slow_bundle(model: Path, out: Path, private_key: Path, name: str) -> Path:
    """A healthy but slower version: the same model as an fp32 GGUF, signed."""
    import shutil

    from slmops.bundle.build import build_bundle
    from slmops.bundle.signing import sign_bundle
    from slmops.optimize.engine import run_recipe
    from slmops.optimize.recipe import RecipeFile, compile_recipe

    recipe = RecipeFile(
        name="slow-fp32",
        description="fp32 GGUF: no quantization, no pruning",
        variants={"gguf-f32": [{"export-gguf": {"outtype": "f32"}}]},
    )
    variants = out.parent / "slow-variants"
    run_recipe(model, compile_recipe(recipe), variants)
    shutil.rmtree(out, ignore_errors=True)
    built = build_bundle(variants, None, name=name, version=SLOW_VERSION, out=out)
    sign_bundle(built.path, private_key)
    return built.path


def canary_policy(*, metrics: bool) -> dict[str, Any]:
    gates: dict[str, Any] = {
        "min_soak_seconds": 20 if metrics else 0,
        "timeout_seconds": 240,
        "min_reported": 1.0,
        "on_failure": "rollback",
    }
    if metrics:
        gates["metrics"] = [
            {"metric": "latency_p95_ms", "better": "lower", "tolerance": 0.25, "min_samples": 8},
            {"metric": "tokens_per_s", "better": "higher", "tolerance": 0.25, "min_samples": 8},
        ]
        return {"waves": [{"count": 1}, {"percent": 100}], "gates": gates}
    return {"waves": [{"percent": 100}], "gates": gates}


def metric_gate_demo(
    fleet: Fleet,
    *,
    model: Path,
    name: str,
    version: str,
    keys: Path,
    as_json: bool,
) -> dict[str, Any]:
    """Kiosks on ``version``, then the slower 1.2.0 stopped by the metric gates."""
    from slmops.bundle.registry import push

    slow = make_slow_bundle(model, fleet.root / "slow-bundle", keys / "slmops.key", name)
    specs = kiosks_for(slow)
    start_agents(fleet, keys / "slmops.pub", specs, KIOSK_SELECTOR)
    doc = blueprint(
        name,
        version,
        name="demo-kiosks",
        selector=KIOSK_SELECTOR,
        rollout=canary_policy(metrics=False),
    )
    first = apply_and_wait(fleet, name, version, True, doc)
    if first["status"] != "succeeded":
        raise CheckFailedError(f"kiosks did not reach {version}: {first['status']}")
    address = fleet.url.removeprefix("http://")
    push(slow, f"oci://{address}/{name}:{SLOW_VERSION}", token=fleet.admin)
    if not as_json:
        out_console.print(
            f"kiosk-1..3 ({specs[0].profile}) run {version}; rolling out {SLOW_VERSION} "
            "(fp32: healthy, slower) with metric gates: canary vs the kiosks still on "
            f"{version}, p95 latency and tokens/s within 25%"
        )
    doc = blueprint(
        name,
        SLOW_VERSION,
        name="demo-kiosks",
        selector=KIOSK_SELECTOR,
        rollout=canary_policy(metrics=True),
    )
    ids = [k.device_id for k in specs]
    with traffic(fleet, ids, max_tokens=48):
        result = apply_and_wait(fleet, name, SLOW_VERSION, as_json, doc)

    def settled() -> list[dict[str, Any]] | None:  # the canary's next check-in reports it
        rows = [r for r in devices_table(fleet) if r["device_id"] in ids]
        return rows if all(r["version"] == version for r in rows) else None

    kiosks: list[dict[str, Any]] = _wait_until(
        "the canary back on the old version", settled, 30, fleet
    )
    if not as_json:
        print_devices(kiosks)
    metric_fail = any(
        g["gate"].startswith("metric:") and g["status"] == "fail"
        for w in result["wave_list"]
        for g in ((w.get("decision") or {}).get("results") or [])
    )
    if result["status"] != "rolled-back" or not metric_fail:
        unplaced = "; ".join(f"{n}: {why}" for why, n in (result.get("unplaceable") or {}).items())
        raise CheckFailedError(
            f"the slower {SLOW_VERSION} was not stopped by a metric gate "
            f"(rollout {result['status']}" + (f"; unplaceable: {unplaced})" if unplaced else ")"),
            where=fleet.root,
            hint="the kiosks cannot hold that version: give them more RAM for the model"
            if unplaced
            else "the box may be too busy for a stable comparison; run the demo again",
        )
    return {"rollout": result, "kiosks": kiosks}
