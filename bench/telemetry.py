"""Benchmark telemetry: bytes a device sends per day, and ingestion batches per second.

1. Bytes per device per day at one request a minute: a simulated day (injected clock) through
   the agent's real ``Aggregator`` and ``Outbox`` with the default ``TelemetryPolicy`` (15-minute
   windows), each request carrying ~100 per-token log-probs, a health check and an RSS reading
   a minute; every batch sent and acknowledged as it is ready (the worst case for compression).
   Once exact and once with differential privacy (epsilon 1). Target: <= 100 KB per device per
   day (balena's default telemetry costs about 0.9 MB a day).
2. Ingestion batches/s: ``slmops server run`` on SQLite (and on a throwaway PostgreSQL unless
   skipped), N enrolled devices posting real gzip-compressed batches of one window each, every
   batch with a fresh batch id (nothing deduplicated) and its window in the server's present
   (the run first checks that one batch is stored, not skipped as out of the clock-skew
   bounds), on keep-alive connections from a separate asyncio process; with 1 and with 2 API
   processes (``--workers``; a 2-core node runs 2).
   Target: >= 330 batches/s (100,000 devices sending one batch every 5 minutes) on one 2-core
   node. Beside it, a bare FastAPI endpoint under the same uvicorn settings that accepts the
   same request (reads the gzip body, inflates it, validates the ``TelemetryBatch``, answers
   the same JSON) and stores nothing, measured right before and after each database's run
   (the mean of the two is that row's reference, ``bare_per_s``, so a busy box weighs on both
   sides): target >= 0.5x that endpoint (``ratios``).

    .venv/bin/python bench/telemetry.py [--json] [--devices 100] [--concurrency 16]
        [--seconds 8] [--workers 1,2] [--skip bytes,sqlite,pg]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import (
    cli_json,
    enroll_fleet,
    free_port,
    run_raw_loadgen,
    running,
    scratch,
    server_cli,
)
from slmops.agent.outbox import Outbox
from slmops.agent.telemetry import Aggregator
from slmops.protocol.telemetry import TelemetryBatch, TelemetryPolicy

DAY = 86400.0
TARGET_BYTES_PER_DAY = 100_000
TARGET_BATCHES_PER_S = 330.0


def bytes_per_day(epsilon: float | None, seed: int = 0) -> dict[str, Any]:
    """One simulated day at one request a minute; bytes as acknowledged by the outbox."""
    policy = TelemetryPolicy(epsilon=epsilon)
    rng = random.Random(seed)
    now = [1_800_000_000.0]  # a fixed UTC midnight-aligned start keeps the day boundary still
    now[0] -= now[0] % DAY
    start = now[0]
    agg = Aggregator(policy, clock=lambda: now[0], rng=random.Random(seed + 1))
    agg.set_model("assistant", "1.0.0", "gguf-q4_k_m", None)
    with tempfile.TemporaryDirectory(prefix="slmops-bench-outbox-") as tmp:
        outbox = Outbox(Path(tmp), policy, clock=lambda: now[0])
        sent = batches = 0
        for minute in range(int(DAY // 60)):
            now[0] = start + minute * 60 + 1
            tokens = rng.randint(20, 200)
            agg.record_request(
                ttft_ms=rng.uniform(20, 400),
                latency_ms=rng.uniform(200, 4000),
                prompt_tokens=rng.randint(10, 300),
                output_tokens=tokens,
                decode_tps=rng.uniform(5, 60),
                logprobs=[-abs(rng.gauss(0.8, 0.7)) for _ in range(min(tokens, 100))],
                entropies=[abs(rng.gauss(1.5, 0.5)) for _ in range(min(tokens, 100))],
            )
            agg.record_health(True)
            agg.record_rss(600 << 20)
            outbox.put(windows=agg.close_due(now[0]))
            while (ready := outbox.next_batch()) is not None:
                batch_id, payload = ready
                sent += len(payload)
                batches += 1
                outbox.ack(batch_id)
        now[0] = start + DAY - 1
        outbox.put(windows=agg.close_due(start + DAY))
        while (ready := outbox.next_batch()) is not None:
            sent += len(ready[1])
            batches += 1
            outbox.ack(ready[0])
    return {
        "epsilon": epsilon,
        "requests": int(DAY // 60),
        "batches": batches,
        "bytes_per_day": sent,
        "ratio_to_target": round(sent / TARGET_BYTES_PER_DAY, 3),
    }


def batch_bytes(rng: random.Random, at: float | None = None) -> bytes:
    """One realistic gzip batch (one window) with a fresh id, as an agent would post it.

    The window is the last 5-minute window closed before ``at`` (default: now), so the server
    stores it: a window dated outside the server's clock-skew bounds (``store.MAX_AGE_S``,
    ``store.MAX_AHEAD_S``) is only counted as skipped, and a bench posting such windows
    measures an ingest that writes no window and no roll-up (this one once used a fixed
    1.8e9, 39 days ahead of this box's clock, and did exactly that)."""
    policy = TelemetryPolicy(window_seconds=300)
    now = [(time.time() if at is None else at) - 300.0]
    agg = Aggregator(policy, clock=lambda: now[0], rng=rng)
    agg.set_model("assistant", "1.0.0", "gguf-q4_k_m", None)
    for _ in range(5):
        agg.record_request(
            ttft_ms=rng.uniform(20, 400),
            latency_ms=rng.uniform(200, 4000),
            prompt_tokens=120,
            output_tokens=80,
            decode_tps=30.0,
            logprobs=[-0.7] * 80,
            entropies=[1.2] * 80,
        )
    windows = agg.close_due(now[0] + 600)
    batch = TelemetryBatch(batch_id=uuid.uuid4().hex, windows=windows)
    return gzip.compress(batch.model_dump_json(by_alias=True).encode(), mtime=0)


BARE_APP = textwrap.dedent(
    """
    import sys, zlib
    from typing import Annotated
    import uvicorn
    from fastapi import FastAPI, Header, Request
    from slmops.protocol.telemetry import TelemetryBatch

    app = FastAPI()

    @app.post("/device/v1/telemetry")
    async def telemetry(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, object]:
        raw = await request.body()
        batch = TelemetryBatch.model_validate_json(zlib.decompress(raw, 16 + zlib.MAX_WBITS))
        assert authorization
        return {"batch_id": batch.batch_id, "accepted": len(batch.windows),
                "duplicate": False, "skipped": 0}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if __name__ == "__main__":
        port, workers = int(sys.argv[1]), int(sys.argv[2])
        if workers == 1:
            uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
        else:
            # slmops' own way to run N workers (TCP_NODELAY on every connection)
            from slmops.server.listen import serve_workers
            serve_workers("bare_telemetry:app", host="127.0.0.1", port=port,
                          log_level="warning", workers=workers)
    """
)


def requests_for(port: int, devices: list[dict[str, str]], args: argparse.Namespace) -> list[bytes]:
    """Enough distinct gzip batches that none repeats during the run (none is deduplicated)."""
    rng = random.Random(7)
    n = int(args.concurrency * (args.seconds + args.warmup) * 600)
    n = min(n, 60_000)
    proto = [batch_bytes(rng) for _ in range(16)]
    reqs = []
    for i in range(n):
        dev = devices[i % len(devices)]
        doc = json.loads(gzip.decompress(proto[i % len(proto)]))
        doc["batch_id"] = f"b{i:08d}{uuid.uuid4().hex[:12]}"
        body = gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0)
        head = (
            f"POST /device/v1/telemetry HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: {dev['auth']}\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        reqs.append(head.encode() + body)
    return reqs


def bare(work: Path, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """The bare endpoint (no database) on the same requests."""
    (work / "bare_telemetry.py").write_text(BARE_APP)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]),
    }
    fake = [{"auth": "Bearer slmd_" + "x" * 40}] * args.devices
    cmd = [sys.executable, str(work / "bare_telemetry.py"), str(port), str(workers)]
    with running(cmd, f"http://127.0.0.1:{port}/healthz", work / f"bare-{workers}.log", env):
        result: dict[str, Any] = run_raw_loadgen(
            port, requests_for(port, fake, args), args, cycle=False
        )
    return result


def ingest(
    name: str, work: Path, db: str | None, args: argparse.Namespace, workers: int
) -> dict[str, Any]:
    data = work / f"{name}-{workers}"
    data.mkdir(parents=True)
    dbargs = ["--db", db] if db else []
    token = cli_json(server_cli("enrollment-token", "create", "--data", data, *dbargs))["token"]
    port = free_port()
    cmd = server_cli("run", "--data", data, "--port", port, "--workers", workers, *dbargs)
    url = f"http://127.0.0.1:{port}"
    with running(cmd, url + "/healthz", work / f"{name}-{workers}.log"):
        devices = enroll_fleet(url, token, args.devices, prefix=f"bench-{name}-{workers}")
        reqs = requests_for(port, devices, args)
        check_stored(url, devices[0])
        result: dict[str, Any] = run_raw_loadgen(port, reqs, args, cycle=False)
        result["batch_bytes"] = round(sum(len(r) for r in reqs[:50]) / 50)
        result["ratio_to_target"] = round(result["per_s"] / TARGET_BATCHES_PER_S, 2)
    return result


def check_stored(url: str, device: dict[str, str]) -> None:
    """One batch through the server, which must store its window (not skip it): what the
    measured batches will do, so the run measures the whole write path."""
    body = batch_bytes(random.Random(1))
    headers = {"Authorization": device["auth"], "Content-Encoding": "gzip"}
    r = httpx.post(url + "/device/v1/telemetry", content=body, headers=headers, timeout=30)
    r.raise_for_status()
    got = r.json()
    if got.get("accepted") != 1 or got.get("skipped"):
        raise RuntimeError(f"the bench's batch was not stored as one window: {got}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--skip", default="", help="comma list: bytes, sqlite, pg")
    ap.add_argument("--workers", default="1,2", help="API processes to measure, comma list")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {}
    if "bytes" not in args.skip:
        t = time.perf_counter()
        result["bytes_per_day"] = [bytes_per_day(None), bytes_per_day(1.0)]
        result["bytes_seconds"] = round(time.perf_counter() - t, 1)
    work = scratch("slmops-bench-telemetry-")
    counts = [int(w) for w in args.workers.split(",") if w]
    with contextlib.ExitStack() as stack:
        dbs: list[tuple[str, str | None]] = [] if "sqlite" in args.skip else [("sqlite", None)]
        if "pg" not in args.skip:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from pg import postgres_cluster

            dbs.append(("postgresql", stack.enter_context(postgres_cluster())))
        for w in counts:
            # The box is shared and its load moves between runs: the bare endpoint is measured
            # right before every database row and once after the last, and each row's ratio
            # is against the mean of the two bare runs around it (``bare_per_s``).
            around = []
            for name, url in dbs:
                around.append(bare(work, args, w)["per_s"])
                result[f"ingest_{name}_{w}"] = ingest(name, work, url, args, w)
            if dbs:
                around.append(bare(work, args, w)["per_s"])
                for i, (name, _) in enumerate(dbs):
                    mean = round((around[i] + around[i + 1]) / 2, 1)
                    result[f"ingest_{name}_{w}"]["bare_per_s"] = mean
                result[f"bare_{w}"] = {
                    "per_s": round(sum(around) / len(around), 1),
                    "runs_per_s": around,
                }
    result["ratios"] = {
        key.removeprefix("ingest_"): round(r["per_s"] / (r["bare_per_s"] or 1), 3)
        for key, r in result.items()
        if key.startswith("ingest_")
    }
    result["targets"] = {f"ingest_{k}>=0.5x_bare": v >= 0.5 for k, v in result["ratios"].items()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for row in result.get("bytes_per_day", []):
        eps = "exact" if row["epsilon"] is None else f"epsilon {row['epsilon']:g}"
        print(
            f"bytes/device/day at 1 req/min ({eps}): {row['bytes_per_day']:,} B in "
            f"{row['batches']} batches = {row['ratio_to_target']:.2f}x the 100 KB target"
        )
    for key in [k for k in result if k.startswith("ingest_")]:
        if key in result:
            r = result[key]
            _, db, workers = key.split("_")
            print(
                f"ingestion {db}, {workers} worker(s): {r['per_s']:.0f} batches/s "
                f"(p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, {r['batch_bytes']} B/batch, status {r['status']}) = "
                f"{r['ratio_to_target']:.2f}x the 330/s target, "
                f"{result['ratios'][key.removeprefix('ingest_')]:.2f}x bare FastAPI "
                f"({r['bare_per_s']:.0f}/s around it; target 0.5x)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
