"""Benchmark the fleet pieces side by side in one run, and print the ratios against targets.

1. Device check-ins/s and p99 latency. ``slmops server run`` (one uvicorn process, the same
   settings the CLI uses) on SQLite and on a throwaway PostgreSQL cluster, each with N enrolled
   devices polling ``POST /device/v1/checkin`` with their credential and ``If-None-Match`` (an
   idle fleet: every answer is 304). The main row is the server as shipped: idle polls are
   answered from its per-process check-in cache (5 s entries, no database access) once a full
   check-in has filled it. The "full path" rows restart the same server with the cache off
   (``SLMOPS_CHECKIN_CACHE_SECONDS=0``): every poll reads the device row (batched with the
   other requests' reads, ``server/checkin_reader.py``) and compares what it reports with what
   is stored (an idle check-in computes nothing and writes only ``last_seen``, every half poll
   at most, in a batched flush). Beside them, a bare FastAPI endpoint served by the same
   uvicorn settings: a sync POST that parses the same ``CheckIn`` body and answers 304. It
   stays up and is measured again right before every server row; each ratio is against that
   adjacent run, since the load of a shared box moves between runs. The load generator is a
   separate asyncio process on raw keep-alive sockets with pre-built requests; its own ceiling
   is measured against a canned asyncio responder, so you can see it is not the bottleneck. A
   last row per database runs the real app plus one route that authenticates the device the
   ordinary way (an ORM session and ``DeviceDep`` per request) and compares its stored ETag.
   Target: check-ins >= 0.5x the bare endpoint, with the cache and through the full path (the
   aim is ~1,700/s on a 2-core node).
2. Agent idle RSS without a model: a real ``slmops agent`` process (the console entry, and
   ``python -m slmops.cli.agent``) enrolled to the SQLite server, polling a few times; VmRSS
   from /proc. Target: <= 40 MB.
3. Endpoint decode tokens/s: the agent's OpenAI-compatible endpoint (separate process, streamed
   SSE and not streamed) against llama.cpp called directly through the runtime seam on the same
   GGUF and thread count, rounds interleaved (and alternating which side goes first) so a busy
   box weighs on both sides alike. Target: >= 0.95x. Also measured: the endpoint's own cost per
   token, streaming a replay of real token ids from a runtime that computes nothing; that bounds
   what the endpoint can lose at the measured decode speed. On a 2-core box shared with other
   work, llama.cpp's 2 threads make single rounds swing several-fold: read the median ratio.

Run (about 3 minutes with --quick; sections can be skipped):

    .venv/bin/python bench/fleet.py [--quick] [--json] [--devices 200] [--concurrency 16]
        [--seconds 6] [--workers 1] [--skip checkins,pg,nocache,readonly,rss,decode]
        [--variant DIR] [--threads 2] [--tokens 128] [--rounds 3]

All servers listen on 127.0.0.1 only. PostgreSQL needs Debian's postgresql package (initdb).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Return the list of"

# --- 1. check-ins ---------------------------------------------------------------------------

BARE_APP = textwrap.dedent(
    """
    import sys
    from typing import Annotated
    import uvicorn
    from fastapi import FastAPI, Header, Response
    from slmops.protocol.device import CheckIn

    app = FastAPI()
    ETAG = '"0123456789abcdef0123456789abcdef"'

    @app.post("/device/v1/checkin")
    def check_in(
        body: CheckIn,
        authorization: Annotated[str | None, Header()] = None,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        headers = {"ETag": ETAG, "Cache-Control": "no-cache"}
        if if_none_match == ETAG and authorization:
            return Response(status_code=304, headers=headers)
        return Response(b'{"device_id":"x"}', media_type="application/json", headers=headers)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if __name__ == "__main__":  # the same uvicorn arguments `slmops server run` uses
        port, workers = int(sys.argv[1]), int(sys.argv[2])
        if workers == 1:
            uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
        else:
            from slmops.server.listen import serve_workers
            serve_workers("bare_app:app", host="127.0.0.1", port=port, log_level="warning",
                          workers=workers)
    """
)

# What an idle check-in could cost if it only authenticated and compared the ETag: the real app
# (create_app, same database, same deps) plus one route that reads the caller's row and answers
# 304 when If-None-Match is its stored ETag, writing nothing. A ceiling for checkin.py, not a
# replacement: the real check-in also records what the device reported.
READONLY_APP = textwrap.dedent(
    """
    import sys
    from typing import Annotated
    import uvicorn
    from fastapi import Header, Response
    from slmops.protocol.device import CheckIn
    from slmops.server.api.deps import DeviceDep
    from slmops.server.app import create_app
    from slmops.server.settings import load_settings

    app = create_app(load_settings(data_dir=sys.argv[2], db_url=sys.argv[3] or None))

    @app.post("/bench/checkin-readonly")
    def check_in(
        body: CheckIn, device: DeviceDep, if_none_match: Annotated[str | None, Header()] = None
    ) -> Response:
        headers = {"ETag": device.desired_etag or "", "Cache-Control": "no-cache"}
        if if_none_match and if_none_match == device.desired_etag:
            return Response(status_code=304, headers=headers)
        return Response(b"{}", media_type="application/json", headers=headers)

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)

# The cheapest HTTP/1.1 responder asyncio can be: what the load generator alone can do.
CANNED = textwrap.dedent(
    """
    import asyncio, sys
    RESP = (b"HTTP/1.1 304 Not Modified\\r\\netag: \\"x\\"\\r\\ncache-control: no-cache\\r\\n"
            b"content-length: 0\\r\\n\\r\\n")
    OK = b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok"
    async def handle(r, w):
        try:
            while True:
                head = await r.readuntil(b"\\r\\n\\r\\n")
                n = 0
                for line in head.split(b"\\r\\n"):
                    if line[:15].lower() == b"content-length:":
                        n = int(line[15:])
                if n:
                    await r.readexactly(n)
                w.write(OK if head.startswith(b"GET") else RESP)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()
    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        async with srv:
            await srv.serve_forever()
    asyncio.run(main())
    """
)


_KEPT: set[Path] = set()


def scratch(prefix: str) -> Path:
    """A work folder for this bench run (servers' data and logs), removed when the run ends
    and kept, with its path printed, when it ends in an uncaught exception, is killed (no
    exit handlers run then) or a section that caught its own error says so (``keep``), so
    the logs of a failed run are there to read. A run that ends with unmet targets reports
    them itself: its folder goes too."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    previous = sys.excepthook

    def on_error(*exc: Any) -> None:
        keep(work)
        previous(*exc)

    sys.excepthook = on_error
    atexit.register(lambda: work in _KEPT or shutil.rmtree(work, ignore_errors=True))
    return work


def keep(work: Path) -> None:
    """Keep ``work`` (a ``scratch`` folder) after the run: something in it failed."""
    if work not in _KEPT:
        _KEPT.add(work)
        print(f"kept {work} for its logs", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def running(
    cmd: list[str], health: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(health, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "slmops.cli.server", *map(str, args)]


def cli_json(cmd: list[str]) -> dict[str, Any]:
    res = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(res.stderr + res.stdout)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def inventory(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "arch": "x86_64",
        "cores": 4,
        "ram_bytes": 8 << 30,
        "free_disk_bytes": 32 << 30,
        "runtimes": ["gguf"],
        "agent_version": "bench",
        "model_ram_bytes": 4 << 30,
        "model_cores": 4,
        "profile": None,
        "labels": labels,
    }


def enroll_fleet(url: str, token: str, n: int, prefix: str = "bench") -> list[dict[str, str]]:
    """Enroll ``n`` devices and check each in once; returns [{auth, etag, body}] per device.
    ``prefix`` names them: runs sharing one database need their own (an id enrolled before
    cannot be taken over by a new enrollment: it waits for an operator's approval)."""
    devices = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(n):
            device_id = f"{prefix}-{i:05d}"
            inv = inventory({"site": "bench", "rack": str(i % 8)})
            r = c.post(
                "/device/v1/enroll",
                json={"enrollment_token": token, "device_id": device_id, "inventory": inv},
            )
            r.raise_for_status()
            auth = "Bearer " + r.json()["credential"]
            body = json.dumps({"schema": "slmops.device/v1", "inventory": inv})
            r = c.post(
                "/device/v1/checkin",
                content=body,
                headers={"Authorization": auth, "Content-Type": "application/json"},
            )
            r.raise_for_status()
            devices.append({"auth": auth, "etag": r.headers["etag"], "body": body})
    return devices


def loadgen_spec(
    port: int, devices: list[dict[str, str]], args: argparse.Namespace, path: str
) -> list[bytes]:
    """One keep-alive HTTP request per device: its check-in with its credential and ETag."""
    reqs = []
    for d in devices:
        body = d["body"].encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: {d['auth']}\r\nIf-None-Match: {d['etag']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        reqs.append(head.encode() + body)
    return reqs


def run_raw_loadgen(
    port: int, reqs: list[bytes], args: argparse.Namespace, *, cycle: bool = True
) -> Any:
    """Send pre-built requests from a separate asyncio process (see ``_loadgen``); with
    ``cycle`` false each request is sent at most once (e.g. batches that must all be new)."""
    spec = {
        "port": port,
        "requests": [r.hex() for r in reqs],
        "cycle": cycle,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "warmup": args.warmup,
    }
    fd, name = tempfile.mkstemp(prefix="slmops-loadgen-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    try:
        res = subprocess.run(
            [sys.executable, __file__, "--loadgen", name],
            capture_output=True,
            text=True,
            timeout=args.seconds + args.warmup + 120,
        )
        if res.returncode != 0:
            raise RuntimeError(res.stderr)
        return json.loads(res.stdout)
    finally:
        Path(name).unlink()


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: ``concurrency`` keep-alive connections, each sends the next device's
    request as soon as the previous answer is read. Latencies only after the warm-up."""
    reqs = [bytes.fromhex(r) for r in spec["requests"]]
    cycle = bool(spec.get("cycle", True))
    conc = int(spec["concurrency"])
    t_start = time.perf_counter()
    t_measure = t_start + float(spec["warmup"])
    t_end = t_measure + float(spec["seconds"])
    lat: list[float] = []
    codes: dict[int, int] = {}

    async def conn(k: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", spec["port"])
        i = k
        perf = time.perf_counter
        while True:
            t0 = perf()
            if t0 >= t_end or (not cycle and i >= len(reqs)):
                break
            w.write(reqs[i % len(reqs)])
            i += conc
            head = await r.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    n = int(line[15:])
            if n:
                await r.readexactly(n)
            t1 = perf()
            if t0 >= t_measure:
                lat.append(t1 - t0)
                code = int(head[9:12])
                codes[code] = codes.get(code, 0) + 1
        w.close()

    await asyncio.gather(*(conn(k) for k in range(conc)))
    lat.sort()
    n = len(lat)
    return {
        "requests": n,
        "per_s": round(n / float(spec["seconds"]), 1),
        "p50_ms": round(lat[n // 2] * 1000, 2) if n else None,
        "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1000, 2) if n else None,
        "status": {str(k): v for k, v in sorted(codes.items())},
    }


def run_loadgen(
    port: int,
    devices: list[dict[str, str]],
    args: argparse.Namespace,
    path: str = "/device/v1/checkin",
) -> Any:
    return run_raw_loadgen(port, loadgen_spec(port, devices, args, path), args)


def control_plane_checkins(
    name: str, work: Path, db: str | None, args: argparse.Namespace, bare: Any
) -> dict[str, Any]:
    """The server's rows on one database; ``bare()`` measures the bare endpoint right before
    each (``bare_per_s``), so each ratio compares runs made under the same load."""
    data = work / name
    data.mkdir(parents=True)
    dbargs = ["--db", db] if db else []
    token = cli_json(server_cli("enrollment-token", "create", "--data", data, *dbargs))["token"]
    port = free_port()
    cmd = server_cli("run", "--data", data, "--port", port, "--workers", args.workers, *dbargs)
    url = f"http://127.0.0.1:{port}"
    with running(cmd, url + "/healthz", work / f"{name}.log"):
        devices = enroll_fleet(url, token, args.devices)
        adjacent = bare()
        result: dict[str, Any] = run_loadgen(port, devices, args) | {"bare_per_s": adjacent}
        if name == "sqlite" and "rss" not in args.skip:
            result["agent_rss"] = agent_rss(url, token, work, args)
    if "nocache" not in args.skip:  # every check-in through the full path (cache off)
        port = free_port()
        cmd = server_cli("run", "--data", data, "--port", port, "--workers", args.workers, *dbargs)
        env = {**os.environ, "SLMOPS_CHECKIN_CACHE_SECONDS": "0"}
        with running(cmd, f"http://127.0.0.1:{port}/healthz", work / f"{name}-full.log", env):
            adjacent = bare()
            result["full_path"] = run_loadgen(port, devices, args) | {"bare_per_s": adjacent}
    if "readonly" not in args.skip:
        port = free_port()
        cmd = [sys.executable, "-c", READONLY_APP, str(port), str(data), db or ""]
        with running(cmd, f"http://127.0.0.1:{port}/healthz", work / f"{name}-ro.log"):
            adjacent = bare()
            ro = run_loadgen(port, devices, args, "/bench/checkin-readonly")
            result["readonly"] = ro | {"bare_per_s": adjacent}
    return result


def checkins(args: argparse.Namespace) -> dict[str, Any]:
    work = scratch("slmops-bench-fleet-")
    fake = [
        {"auth": "Bearer slmd_" + "x" * 40, "etag": '"0123456789abcdef0123456789abcdef"'}
        | {"body": json.dumps({"schema": "slmops.device/v1", "inventory": inventory({})})}
    ] * args.devices
    out: dict[str, Any] = {"devices": args.devices, "concurrency": args.concurrency}
    port = free_port()
    with running(
        [sys.executable, "-c", CANNED, str(port)],
        f"http://127.0.0.1:{port}/",
        work / "canned.log",
    ):
        out["loadgen_ceiling"] = run_loadgen(port, fake, args)
    port = free_port()
    (work / "bare_app.py").write_text(BARE_APP)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]),
    }
    # The bare endpoint stays up (idle) and is measured right before every server row: on a
    # shared box the load moves between runs, and a ratio of adjacent runs moves less.
    with running(
        [sys.executable, str(work / "bare_app.py"), str(port), str(args.workers)],
        f"http://127.0.0.1:{port}/healthz",
        work / "bare.log",
        env,
    ):
        bare_port = port

        def bare() -> float:
            return float(run_loadgen(bare_port, fake, args)["per_s"])

        out["bare"] = run_loadgen(port, fake, args)
        out["sqlite"] = control_plane_checkins("sqlite", work, None, args, bare)
        if "pg" not in args.skip:
            sys.path.insert(0, str(ROOT / "tests"))
            from pg import postgres_cluster

            with postgres_cluster() as url:
                out["postgresql"] = control_plane_checkins("postgresql", work, url, args, bare)

    def ratio(row: dict[str, Any]) -> float:
        return round(row["per_s"] / (row.get("bare_per_s") or out["bare"]["per_s"] or 1.0), 3)

    dbs = [k for k in ("sqlite", "postgresql") if k in out]
    out["ratios"] = {k: ratio(out[k]) for k in dbs}
    out["ratios"] |= {
        f"{k}_full_path": ratio(out[k]["full_path"]) for k in dbs if "full_path" in out[k]
    }
    out["ratios"] |= {
        f"{k}_readonly_ceiling": ratio(out[k]["readonly"]) for k in dbs if "readonly" in out[k]
    }
    bare_rate = out["bare"]["per_s"] or 1.0
    out["bare_vs_loadgen_ceiling"] = round(bare_rate / (out["loadgen_ceiling"]["per_s"] or 1.0), 3)
    return out


# --- 2. agent idle RSS ----------------------------------------------------------------------


def rss_only(args: argparse.Namespace) -> dict[str, Any]:
    work = scratch("slmops-bench-fleet-")
    data = work / "server"
    data.mkdir()
    token = cli_json(server_cli("enrollment-token", "create", "--data", data))["token"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        server_cli("run", "--data", data, "--port", port), url + "/healthz", work / "s.log"
    ):
        return agent_rss(url, token, work, args)


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def agent_rss(url: str, token: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """RSS of an idle agent (no model) after a few polls, for each way of starting it."""
    slmops = Path(sys.executable).parent / "slmops"
    entries = {"slmops agent": [str(slmops), "agent"]} if slmops.exists() else {}
    entries["python -m slmops.cli.agent"] = [sys.executable, "-m", "slmops.cli.agent"]
    out: dict[str, Any] = {}
    for i, (label, cmd) in enumerate(entries.items()):
        data = work / f"agent-{i}"
        data.mkdir()
        full = [
            *cmd,
            "--server",
            url,
            "--data",
            str(data),
            "--enroll-token",
            token,
            "--device-id",
            f"bench-agent-{i}",
            "--poll-seconds",
            "0.5",
            "--api-port",
            "0",
            "--log-level",
            "warning",
        ]
        with (work / f"agent-{i}.log").open("ab") as log:
            proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            polls, samples = 0, []
            while time.monotonic() < deadline and polls < 6:
                time.sleep(0.25)
                if proc.poll() is not None:
                    raise RuntimeError(f"the agent exited {proc.returncode}: see {log.name}")
                with contextlib.suppress(OSError, ValueError):
                    status = json.loads((data / "agent-status.json").read_text())
                    polls = int(status.get("checkins", 0))
                if polls >= 2:
                    samples.append(vm_rss_mb(proc.pid))
            out[label] = {"polls": polls, "vm_rss_mb": round(max(samples or [0.0]), 1)}
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return out


# --- 3. endpoint decode ---------------------------------------------------------------------

SERVER = textwrap.dedent(
    """
    import sys, threading
    from slmops.agent.openai_api import Served, serve_in_thread
    from slmops.protocol.device import GenerationDefaults
    from slmops.runtimes import open_runtime

    class Instant:  # replays real token ids with no compute: the endpoint's own cost per token
        def __init__(self, rt, ids):
            self.rt, self.ids = rt, ids
        def __getattr__(self, name):
            return getattr(self.rt, name)
        def stream(self, ids, max_tokens, temperature=0.0):
            yield from self.ids[:max_tokens]

    rt = open_runtime(sys.argv[1], threads=int(sys.argv[2]), n_ctx=512)
    ids = ([rt.bos_id] if rt.bos_id is not None else []) + rt.tokenize(sys.argv[3])
    replay = []
    def record():  # on a thread that ends: its llama.cpp (OpenMP) worker team goes with it
        replay.extend(t for t in rt.generate(ids, 480, stop_at_eos=False)[0] if t not in rt.eos_ids)
    worker = threading.Thread(target=record)
    worker.start()
    worker.join()
    fake = Instant(rt, replay)
    srv, t = serve_in_thread(lambda: Served(rt, "bench", GenerationDefaults()))
    srv2, _ = serve_in_thread(lambda: Served(fake, "bench", GenerationDefaults()))
    print(srv.server_address[1], srv2.server_address[1], len(replay), flush=True)
    t.join()
    """
)


def default_variant() -> Path:
    from slmops.cli.optimize import default_recipe_path
    from slmops.model.demo import train_demo_model
    from slmops.optimize.engine import run_recipe
    from slmops.optimize.recipe import load_recipe

    cache = Path.home() / ".cache" / "slmops"
    model = train_demo_model(cache / "bench-evaluate" / "model").path
    run = run_recipe(
        model, load_recipe(default_recipe_path()), cache / "bench-variants", only=["gguf-q4_k_m"]
    )
    return run.variants[0].path


def endpoint_tps(port: int, tokens: int) -> tuple[float, int]:
    """Streamed: stamp each SSE event as its bytes arrive, parse them only afterwards, so the
    client spends as little CPU as possible while llama.cpp decodes on the same cores."""
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    events: list[tuple[float, bytes]] = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        payload = json.dumps(body).encode()
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            now = time.perf_counter()
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                events.append((now, event))
            if events and events[-1][1].endswith(b"data: [DONE]"):
                break
    stamps = []
    for t, event in events:
        line = event.rsplit(b"\r\n", 1)[-1]  # the first event follows the response head
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
            stamps.append(t)
    n = len(stamps)
    return ((n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0), n


def endpoint_blocking_tps(port: int, tokens: int, direct_ttft: float) -> float:
    """Non-streamed: tokens / (wall time minus the direct run's time to first token), so both
    sides time decoding only (the prompt is the same few tokens on both). http.client on an
    open connection, so no client set-up (httpx builds an SSL context per call) is timed."""
    import http.client

    body = json.dumps({"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.connect()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    doc = json.loads(conn.getresponse().read())
    elapsed = time.perf_counter() - t0 - direct_ttft
    conn.close()
    n = int(doc["usage"]["completion_tokens"])
    return (n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0


def decode(args: argparse.Namespace) -> dict[str, Any]:
    from slmops.runtimes import open_runtime

    variant = args.variant or default_variant()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(variant), str(args.threads), PROMPT],
        stdout=subprocess.PIPE,
        text=True,
    )
    rt = open_runtime(variant, threads=args.threads, n_ctx=512)
    ids = ([rt.bos_id] if rt.bos_id is not None else []) + rt.tokenize(PROMPT)

    def settle() -> None:
        # llama.cpp's worker threads spin for a while after a generation before they sleep: a
        # side measured right after the other (in the other process) would share the 2 cores
        # with those spinning threads. Wait them out before every measured run.
        time.sleep(args.gap)

    def direct() -> tuple[float, float, int]:
        settle()
        out, stats = rt.generate(ids, args.tokens)
        return stats.decode_tokens_per_s, stats.ttft_s, len(out)

    def streamed() -> tuple[float, int]:
        settle()
        return endpoint_tps(port, args.tokens)

    try:
        assert proc.stdout is not None
        port, instant_port, replay = map(int, proc.stdout.readline().split())
        overhead = []
        for _ in range(3):
            t0 = time.perf_counter()
            _, k = endpoint_tps(instant_port, replay)
            overhead.append((time.perf_counter() - t0) / max(k, 1))
        endpoint_tps(port, 8)  # warm-up, both sides
        rt.generate(ids, 8)
        api, direct_tps, blocking, ratios, bratios = [], [], [], [], []
        nd = ne = 0
        for i in range(args.rounds):
            if i % 2 == 0:
                d, ttft, nd = direct()
                e, ne = streamed()
                settle()
                b = endpoint_blocking_tps(port, args.tokens, ttft)
                d2, _, _ = direct()  # the direct run beside the blocking one
            else:
                settle()
                e, ne = streamed()
                d, ttft, nd = direct()
                d2 = d
                settle()
                b = endpoint_blocking_tps(port, args.tokens, ttft)
            api.append(e)
            direct_tps.append(d)
            blocking.append(b)
            ratios.append(e / d if d else 0.0)
            bratios.append(b / d2 if d2 else 0.0)
    finally:
        proc.kill()
        proc.wait()
        rt.close()
    return {
        "variant": str(variant),
        "threads": args.threads,
        "tokens": args.tokens,
        "endpoint_decode_tps": round(statistics.median(api), 1),
        "direct_decode_tps": round(statistics.median(direct_tps), 1),
        "endpoint_blocking_tps": round(statistics.median(blocking), 1),
        "streamed_ratio": round(statistics.median(ratios), 3),
        "streamed_ratios": [round(r, 3) for r in ratios],
        "blocking_ratio": round(statistics.median(bratios), 3),
        "blocking_ratios": [round(r, 3) for r in bratios],
        "tokens_generated": {"endpoint": ne, "direct": nd},
        "endpoint_overhead_us_per_token": round(min(overhead) * 1e6, 1),
        "ratio_bound_from_overhead": round(
            1 / (1 + min(overhead) * statistics.median(direct_tps)), 4
        ),
    }


# --- report ---------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> dict[str, bool]:
    t: dict[str, bool] = {}
    c = result.get("checkins")
    if c:
        for k, v in c["ratios"].items():
            if "readonly" not in k:
                t[f"checkins_{k}>=0.5x_bare"] = v >= 0.5
        t["checkins_sqlite>=1700/s"] = c["sqlite"]["per_s"] >= 1700
    rss = result.get("agent_rss") or (c or {}).get("sqlite", {}).get("agent_rss") or {}
    for label, v in rss.items():
        t[f"agent_idle_rss<=40MB ({label})"] = 0 < v["vm_rss_mb"] <= 40
    d = result.get("decode")
    if d:
        t["endpoint_decode>=0.95x_direct (streamed)"] = d["streamed_ratio"] >= 0.95
        t["endpoint_decode>=0.95x_direct (not streamed)"] = d["blocking_ratio"] >= 0.95
    return t


def show(result: dict[str, Any]) -> None:
    c = result.get("checkins")
    if c:
        print(
            f"check-ins: {c['devices']} devices, {c['concurrency']} keep-alive connections, "
            f"idle fleet (If-None-Match), server workers {result['workers']}\n"
        )
        print(f"{'target':34} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}  status")
        rows: list[tuple[str, ...]] = [
            ("load generator ceiling (canned)", "loadgen_ceiling"),
            ("bare FastAPI endpoint", "bare"),
            ("control plane, SQLite", "sqlite"),
            ("control plane, PostgreSQL", "postgresql"),
        ]
        rows += [
            ("  full path (cache off), SQLite", "sqlite", "full_path"),
            ("  full path (cache off), PostgreSQL", "postgresql", "full_path"),
            ("  auth + ETag only, SQLite (ceiling)", "sqlite", "readonly"),
            ("  auth + ETag only, PostgreSQL", "postgresql", "readonly"),
        ]
        for label, key, *sub in rows:
            r = c.get(key, {})
            for k in sub:
                r = r.get(k, {})
            if r:
                print(
                    f"{label:34} {r['per_s']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}  {r['status']}"
                )
        for k, v in c["ratios"].items():
            print(f"ratio {k}/bare {v:.3f} (bare measured right before it)")
        print(f"bare / load generator ceiling {c['bare_vs_loadgen_ceiling']:.3f}")
    rss = result.get("agent_rss") or (c or {}).get("sqlite", {}).get("agent_rss") or {}
    for label, v in rss.items():
        print(f"agent idle RSS ({label}, no model, {v['polls']} polls): {v['vm_rss_mb']:.1f} MB")
    d = result.get("decode")
    if d:
        print(
            f"\ndecode: variant {d['variant']}, {d['threads']} threads, up to {d['tokens']} tokens"
        )
        print(f"{'path':36} {'decode tok/s':>12}")
        print(f"{'llama.cpp direct (runtime seam)':36} {d['direct_decode_tps']:12.1f}")
        print(f"{'agent OpenAI endpoint (SSE, HTTP)':36} {d['endpoint_decode_tps']:12.1f}")
        print(f"{'agent OpenAI endpoint, not streamed':36} {d['endpoint_blocking_tps']:12.1f}")
        print(
            f"ratio endpoint/direct {d['streamed_ratio']:.3f} streamed {d['streamed_ratios']}, "
            f"{d['blocking_ratio']:.3f} not streamed {d['blocking_ratios']}"
        )
        print(
            f"endpoint's own cost {d['endpoint_overhead_us_per_token']} us/token streamed "
            f"(instant runtime, client included): at most {d['ratio_bound_from_overhead']:.4f}x "
            "lost to it at this decode speed; the rest of any gap is the box (2 cores)"
        )
    print()
    for name, ok in result["targets"].items():
        print(f"  target {name:48} {'met' if ok else 'MISSED'}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        spec = json.loads(Path(sys.argv[2]).read_text())
        print(json.dumps(asyncio.run(_loadgen(spec))))
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="shorter runs (3 s, 2 decode rounds)")
    ap.add_argument(
        "--skip", default="", help="comma list of: checkins, pg, nocache, readonly, rss, decode"
    )
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--workers", type=int, default=1, help="`slmops server run --workers`")
    ap.add_argument("--variant", type=Path, help="GGUF variant folder (default: the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4, help="decode rounds (each: both sides)")
    ap.add_argument("--gap", type=float, default=1.0, help="idle seconds before each decode run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.quick:
        args.seconds, args.warmup = 3.0, 1.0
    result: dict[str, Any] = {"workers": args.workers}
    if "checkins" not in args.skip:
        result["checkins"] = checkins(args)
    elif "rss" not in args.skip:
        result["agent_rss"] = rss_only(args)
    if "decode" not in args.skip:
        result["decode"] = decode(args)
    result["targets"] = targets(result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
