"""Telemetry as a device sends it: histogram windows, gzip batches posted to the ingest endpoint,
enrolled devices checking in, and operator queries over the stored figures.
"""

from __future__ import annotations

import gzip
import json
import statistics
import uuid
from bisect import bisect_left
from typing import Any

import httpx

from factories.server import (
    Server,
    credential,
    enrollment_token,
    inventory,
    make_token,
)
from slmops.protocol.telemetry import BOUNDS

HOUR = 3600


def hist(name: str, values: list[float]) -> dict[str, Any]:
    counts = [0.0] * (len(BOUNDS[name]) + 1)
    for v in values:  # bucket i holds (bounds[i-1], bounds[i]]
        counts[bisect_left(BOUNDS[name], v)] += 1
    return {"counts": counts, "sum": float(sum(values)), "count": float(len(values))}


def window(
    start: float,
    *,
    version: str,
    latency: list[float],
    tps: list[float] | None = None,
    out_tokens: list[float] | None = None,
    logprobs: list[float] | None = None,
    errors: int = 0,
    model: str = "m",
    variant: str = "q4",
    rollout_id: str | None = None,
    feedback: tuple[int, int] = (0, 0),
    noised: list[str] | None = None,
) -> dict[str, Any]:
    hists = {"latency_ms": hist("latency_ms", latency), "ttft_ms": hist("ttft_ms", latency)}
    if tps:
        hists["decode_tps"] = hist("decode_tps", tps)
    if out_tokens:
        hists["output_tokens"] = hist("output_tokens", out_tokens)
    if logprobs:
        hists["logprob"] = hist("logprob", logprobs)
    w: dict[str, Any] = {
        "start": start,
        "end": start + 300,
        "model": model,
        "version": version,
        "variant": variant,
        "rollout_id": rollout_id,
        "requests": len(latency),
        "errors": {"runtime": errors} if errors else {},
        "output_tokens": sum(out_tokens or []),
        "histograms": hists,
        "feedback": {"up": feedback[0], "down": feedback[1]},
        "noised": noised or [],
    }
    if logprobs:
        w["logprob_mean"] = statistics.fmean(logprobs)
        w["quality_tokens"] = len(logprobs)
    return w


def batch(windows: list[dict[str, Any]], dropped: int = 0, batch_id: str | None = None) -> Any:
    return {
        "schema": "slmops.telemetry/v1",
        "batch_id": batch_id or uuid.uuid4().hex,
        "windows": windows,
        "dropped_windows": dropped,
    }


def post(server: Server, cred: str, doc: Any, *, gz: bool = True) -> httpx.Response:
    body = json.dumps(doc).encode()
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "application/json"}
    if gz:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return httpx.post(server.url + "/device/v1/telemetry", content=body, headers=headers)


def device(
    server: Server,
    device_id: str,
    profile: str,
    *,
    runs: tuple[str, ...] = (),
    model: str = "m",
    variant: str = "q4",
    **labels: str,
) -> str:
    """An enrolled device; with ``runs`` (active version first, then the previous one) it
    checks in as running them, since the server attributes telemetry from its own record."""
    token = enrollment_token(server, {"fleet": device_id.split("-")[0]})
    cred = credential(server, token, device_id, profile=profile, labels=labels)
    if runs:
        check_in(server, cred, profile, labels, runs, model, variant)
    return cred


def check_in(
    server: Server,
    cred: str,
    profile: str,
    labels: dict[str, str],
    runs: tuple[str, ...],
    model: str = "m",
    variant: str = "q4",
) -> None:
    models = [
        {"name": model, "version": v, "variant": variant, "digest": "sha256:" + "0" * 64}
        for v in runs
    ]
    body: dict[str, Any] = {"inventory": inventory(profile=profile, labels=labels)}
    body |= {"active": models[0]} | ({"previous": models[1]} if len(models) > 1 else {})
    r = httpx.post(
        server.url + "/device/v1/checkin",
        json=body,
        headers={"Authorization": f"Bearer {cred}"},
        timeout=10,
    )
    assert r.status_code in (200, 304), r.text


def query(server: Server, **params: Any) -> list[dict[str, Any]]:
    with server.client(make_token(server, "viewer")) as c:
        r = c.get("/api/v1/telemetry", params=params)
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["data"]
    return rows


def in_bucket(name: str, value: float | None, raw: list[float], q: float) -> None:
    """``value`` lies in the bucket holding the raw ``q`` quantile (nearest rank)."""
    assert value is not None
    ordered = sorted(raw)
    true = ordered[max(0, round(q * len(ordered)) - 1)]
    bounds = BOUNDS[name]
    i = bisect_left(bounds, true)
    lo = bounds[i - 1] if i > 0 else 0
    hi = bounds[i] if i < len(bounds) else bounds[-1]
    assert lo <= value <= hi, (value, true, lo, hi)
