"""Issue 12's scale targets, side by side in one run, each printed with its number, met or not.

a. Idle-fleet check-ins: two `slmops server run` processes on different ports sharing one
   throwaway PostgreSQL, the fleet simulator (src/slmops/fleet) spreading its devices over both,
   polling with If-None-Match at the rate of 100,000 devices polling every 60 s (1,667/s).
   Enrolling 100k devices here takes minutes, so by default fewer devices poll proportionally
   more often (same offered rate; the printout says which). Beside it: the simulator's ceiling
   against the canned responder at the same offered rate and at 20,000/s offered.
b. Full-path check-ins (cache off) against a bare FastAPI endpoint, and telemetry ingestion
   against a bare gzip endpoint: bench/fleet.py's ``checkins`` and bench/telemetry.py's
   ``bare``/``ingest``, imported and run as they are.
c. A staged rollout (1 % / 10 % / 50 % / 100 %) over N simulated devices (2,000; --full
   100,000) with an accelerated clock (poll and install latencies divided by K, K capped so
   the fleet polls at most 2,500 times a second, 1,000 past 10,000 devices: x60 for 2,000
   devices, x0.6 for 100,000, i.e. a poll every 100 s;
   each wave soaks 10 accelerated minutes, at most 60 s): every device accounted for, none
   told two targets; then a version that fails on every device: the canary fails and the
   rollout is rolled back before any device outside the canary is told it. Time to enroll,
   time per wave and the exposure (told / ran the bad version).
d. Server time per device report (POST /device/v1/actions latency, as the simulator saw it)
   with 1k and 10k devices in the rollout (100k with --full), the same 1,000 devices moving
   at every size (so the API sees the same report rate and only the rollout's size differs),
   measured after every device's first, full check-in (the fleet warmed first), and the
   PostgreSQL database size per device. Measured through the API, so it reads the
   same whatever the bookkeeping.
e. Leader kill -9 during a rollout: only when /healthz says which process leads the ticker;
   otherwise printed as not measured.
f. Applying a blueprint over 20,000 devices (--full 100,000): an asynchronous apply's answer
   and settle times against a synchronous one's request (bench/_apply.py).

    .venv/bin/python bench/fleet_scale.py [--quick] [--full] [--json] [--devices N]
        [--rollout-devices N] [--soak S] [--report-sizes 1000,10000] [--accelerate 60]
        [--seconds 15] [--apply-devices 20000]
        [--skip a,b,c,d,e,f]

Everything listens on 127.0.0.1. PostgreSQL needs Debian's postgresql package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from _apply import apply_cost  # noqa: E402
from _load import (  # noqa: E402
    MODEL,
    TERMINAL,
    Plane,
    bundles,
    db_bytes,
    plane,
    rollout_run,
    sim_config,
    staged_spec,
    wave_times,
)
from fleet import keep, scratch  # noqa: E402
from pg import postgres_cluster  # noqa: E402
from slmops.bundle.registry import push  # noqa: E402
from slmops.fleet.canned import canned_server  # noqa: E402
from slmops.fleet.simulator import Simulator  # noqa: E402

FLEET_100K_PER_S = 100_000 / 60
ROLLOUT_CHECKINS_PER_S = 2_500.0
# One simulator process holding 100,000 devices tops out near 1,640 polls/s (section a's
# ceiling), and the 2 cores also run both API processes and PostgreSQL: a big fleet polls at
# 1,000/s so the waves' downloads, full check-ins and action reports have room.
BIG_FLEET, BIG_FLEET_CHECKINS_PER_S = 10_000, 1_000.0
MAX_SOAK = 60.0


# --- a. idle fleet --------------------------------------------------------------------------


async def _warm_then_measure(sim: Simulator, warm: float, seconds: float) -> dict[str, Any]:
    """Enroll, then poll until every device has had its first (full) check-in and learned its
    ETag, so the measured window holds the idle fleet's polls and not the tail of the first
    check-ins (a 3,000-device fleet's first answers take longer than one accelerated poll)."""
    await sim.enroll()
    deadline = time.monotonic() + max(120.0, warm * 10)
    while True:
        await sim.simulate(warm)
        if all(d.etag for d in sim.devices) or time.monotonic() > deadline:
            break
    report = await sim.simulate(seconds)
    report["warmed_devices"] = sum(1 for d in sim.devices if d.etag)
    return report


def idle_fleet(pl: Plane, args: argparse.Namespace) -> dict[str, Any]:
    n = args.devices
    poll = 60.0 * n / 100_000
    common = {"devices": n, "poll": poll, "concurrency": args.concurrency, "telemetry": False}
    token = pl.enrollment_token({"fleet": "idle"})
    sim = Simulator(sim_config(pl, None, token, prefix="idle", **common))
    out: dict[str, Any] = {"devices": n, "poll_seconds": round(poll, 3), "servers": len(pl.urls)}
    out["server"] = _slim(asyncio.run(_warm_then_measure(sim, poll * 1.3, args.seconds)))
    sim.cfg.poll = poll / 2  # headroom: the same warmed fleet polling twice as often
    out["server_2x"] = _slim(asyncio.run(sim.simulate(args.seconds)))
    with canned_server() as url:
        same = Simulator(sim_config(None, url, "slme_canned-ceiling", prefix="c", **common))
        out["ceiling_same_rate"] = _slim(asyncio.run(_warm_then_measure(same, poll * 1.3, 5)))
        fast = dict(common, poll=n / 20_000)
        top = Simulator(sim_config(None, url, "slme_canned-ceiling", prefix="m", **fast))
        out["ceiling_max"] = _slim(asyncio.run(_warm_then_measure(top, n / 20_000 * 1.3, 5)))
    return out


def _slim(report: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "enrolled",
        "enroll_per_s",
        "warmed_devices",
        "offered_checkins_per_s",
        "checkins_per_s",
        "checkin_p50_ms",
        "checkin_p99_ms",
        "ratio_304",
        "errors",
        "error_count",
        "schedule_lag_p99_ms",
        "latency_ms",
        "events",
        "final_versions",
        "devices_told_multiple_targets",
        "time_to_converge_s",
    )
    return {k: report[k] for k in keep if k in report}


# --- b. full path and telemetry against bare endpoints ---------------------------------------


def bare_ratios(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import fleet as fleet_bench
    import telemetry as telemetry_bench

    ns = argparse.Namespace(
        devices=100,
        concurrency=16,
        seconds=3.0 if args.quick else 5.0,
        warmup=1.0,
        workers=1,
        skip={"readonly", "rss", "decode"},
    )
    out: dict[str, Any] = {}
    checkins = fleet_bench.checkins(ns)
    out["checkins"] = {
        k: v
        for k, v in checkins["ratios"].items()
        if "full_path" in k or k in ("sqlite", "postgresql")
    }
    out["bare_checkins_per_s"] = checkins["bare"]["per_s"]
    tw = work / "telemetry"
    tw.mkdir()
    bare = telemetry_bench.bare(tw, ns, 1)
    out["bare_telemetry_per_s"] = bare["per_s"]
    telemetry: dict[str, float] = {}
    telemetry["sqlite"] = telemetry_bench.ingest("sqlite", tw, None, ns, 1)["per_s"]
    with postgres_cluster() as url:
        telemetry["postgresql"] = telemetry_bench.ingest("postgresql", tw, url, ns, 1)["per_s"]
    out["telemetry_per_s"] = telemetry
    out["telemetry"] = {k: round(v / (bare["per_s"] or 1), 3) for k, v in telemetry.items()}
    return out


# --- c. staged rollout and failing canary ----------------------------------------------------


def staged_rollout(pl: Plane, args: argparse.Namespace) -> dict[str, Any]:
    n = args.rollout_devices
    # The devices' clock runs K times faster, so they poll N*K/60 times a second: capped at
    # 2,500/s (what two API processes sustain here with room for the waves' full check-ins
    # and action reports), 1,000/s past 10,000 devices (the simulator's own ceiling), so
    # 2,000 devices run at the full x60 and 100,000 at x0.6 (slower than real time).
    cap = ROLLOUT_CHECKINS_PER_S if n <= BIG_FLEET else BIG_FLEET_CHECKINS_PER_S
    k = min(args.accelerate, cap * 60.0 / n)
    # a 10-minute soak per wave on the accelerated clock, at most MAX_SOAK s of real time
    soak = args.soak if args.soak is not None else min(600.0 / k, MAX_SOAK)
    token = pl.enrollment_token({"fleet": "staged"})
    cfg = sim_config(
        pl,
        None,
        token,
        prefix="staged",
        devices=n,
        poll=60.0,
        accelerate=k,
        concurrency=args.concurrency,
        telemetry=False,
        sample_seconds=0.5,
    )
    sim = Simulator(cfg)
    t_enroll = time.monotonic()
    asyncio.run(sim.enroll())
    enroll_s = time.monotonic() - t_enroll
    waves = [1.0, 10.0, 50.0, 100.0]
    t0 = time.monotonic()
    rid, good, doc = asyncio.run(
        rollout_run(
            pl,
            sim,
            lambda: pl.apply("staged", staged_spec("staged", "1.0.0", waves, soak, n)),
            4 * soak + 60 + n / 20,
        )
    )
    out: dict[str, Any] = {
        "devices": n,
        "accelerate": k,
        "soak_seconds": soak,
        "enroll_seconds": round(enroll_s, 1),
        "enroll_per_s": round(n / enroll_s) if enroll_s > 0 else None,
    }
    accounted = sum((doc or {}).get("by_status", {}).values()) + sum(
        ((doc or {}).get("unplaceable") or {}).values()
    )
    out["first"] = {
        "rollout": rid,
        "status": (doc or {}).get("status"),
        "apply_seconds": pl.last_apply_s,
        "apply_answer_ms": pl.last_answer_ms,
        "seconds": round(time.monotonic() - t0, 1),
        "waves": wave_times(doc),
        "by_status": (doc or {}).get("by_status"),
        "accounted": accounted,
        "final_versions": good["final_versions"],
        "devices_told_multiple_targets": good["devices_told_multiple_targets"],
        "errors": good["errors"],
    }
    cfg.fail_versions = {"2.0.0": 1.0}
    rid2, bad, doc2 = asyncio.run(
        rollout_run(
            pl,
            sim,
            lambda: pl.apply("staged", staged_spec("staged", "2.0.0", waves, soak, n)),
            2 * soak + 120 + n / 200,
        )
    )
    canary_entries = pl.rollout_devices(rid2, wave=0) if rid2 else []
    canary = {d["device_id"] for d in canary_entries if d.get("wave") == 0}
    told = {d for d, versions in sim.stats.told.items() if "2.0.0" in versions}
    ran = max((s["versions"].get("2.0.0", 0) for s in bad["versions_over_time"]), default=0)
    out["failing"] = {
        "rollout": rid2,
        "status": (doc2 or {}).get("status"),
        "apply_seconds": pl.last_apply_s,
        "apply_answer_ms": pl.last_answer_ms,
        "waves": wave_times(doc2),
        "canary": len(canary),
        "told_bad_version": len(told),
        "told_outside_canary": len(told - canary),
        "told_outside_sample": sorted(told - canary)[:5],
        "ran_bad_version": ran,
        "final_versions": bad["final_versions"],
        "errors": bad["errors"],
    }
    return out


# --- d. time per device report and database size ----------------------------------------------


async def _warm(sim: Simulator, poll: float, limit: float = 900.0) -> tuple[float, int]:
    """Poll (at up to ~500/s) until every device has had its first, full check-in and holds
    its ETag, then set the fleet back to ``poll``: the reports are then measured beside the
    idle polls of a settled fleet, not beside its first check-ins (at 10,000 devices those
    take the whole first minute, at 1,000 a tenth of it, so they weighed on one size only).
    Returns the seconds it took and how many devices had no ETag when ``limit`` ran out."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + limit
    sim.cfg.poll = max(2.0, len(sim.devices) / 500.0)

    async def until_warm() -> None:
        while not all(d.etag for d in sim.devices):
            await asyncio.sleep(0.5)
        sim.stop()  # every device warm: end the session now, not at its full length

    while not all(d.etag for d in sim.devices) and (left := deadline - time.monotonic()) > 0:
        watch = asyncio.create_task(until_warm())
        await sim.simulate(min(sim.cfg.poll * 1.3, left))
        watch.cancel()
    sim.cfg.poll = poll
    return time.perf_counter() - t0, sum(1 for d in sim.devices if not d.etag)


def report_cost(pl: Plane, args: argparse.Namespace) -> dict[str, Any]:
    """The same number of devices (the smallest size) moves at every size, so the API sees
    the same rate of action reports and only the rollout's size differs: at 1,000 devices a
    100 % wave, at 10,000 a 10 % first wave (the next one held back by a long soak), and so
    on. Measured until that wave's devices all run the version; a held rollout is then
    aborted. The fleet is warmed first (``_warm``), then polls every 60 s, so idle check-ins
    grow with it (17/s at 1k, 167/s at 10k); past 10,000 devices at most 1,000/s (100 s at
    100k), as in (c), since 1,667/s is this box's limit with one simulator process. The
    database size is per enrolled device (all in the rollout's membership), with action rows
    for the moving ones."""
    out: dict[str, Any] = {}
    moving = min(args.report_sizes)
    for m in args.report_sizes:
        fleet = f"rep{m}"
        token = pl.enrollment_token({"fleet": fleet})
        # real-time polls (60 s) so check-ins do not drown the reports; quick installs
        cfg = sim_config(
            pl,
            None,
            token,
            prefix=fleet,
            devices=m,
            poll=60.0,
            concurrency=16,
            telemetry=False,
            sample_seconds=1.0,
            latencies={
                s: 0.5 for s in ("downloading", "verifying", "installing", "health-checking")
            },
        )
        sim = Simulator(cfg)
        before = db_bytes(pl.db_url)
        t0 = time.perf_counter()
        asyncio.run(sim.enroll())
        enroll_s = time.perf_counter() - t0
        # a poll every 60 s, but past 10,000 devices at most 1,000 polls/s, as in (c): 100,000
        # devices polling every 60 s are 1,667/s, what one simulator process tops out at here
        # (a), so the reports would queue behind a saturated box, not measure the server
        poll = 60.0 if m <= BIG_FLEET else max(60.0, m / BIG_FLEET_CHECKINS_PER_S)
        warm_s, cold = asyncio.run(_warm(sim, poll))
        first = 100.0 * moving / m
        waves = [100.0] if first >= 100.0 else [first, 100.0]
        spec = staged_spec(fleet, "1.0.0", waves, 0.0 if len(waves) == 1 else 3600.0)

        def wave_done(doc: dict[str, Any]) -> bool:
            return int((doc.get("by_status") or {}).get("active", 0)) >= moving

        limit = 180 + moving / 50  # a stuck rollout ends the section instead of the bench
        held = len(waves) > 1
        rid, rep, doc = asyncio.run(
            rollout_run(
                pl,
                sim,
                lambda f=fleet, sp=spec: pl.apply(f, sp),  # type: ignore[misc]
                limit,
                wave_done,  # at every size, so the report rates compare over the same span
            )
        )
        after = db_bytes(pl.db_url)
        if held and rid is not None and (doc or {}).get("status") not in TERMINAL:
            with contextlib.suppress(RuntimeError):  # ended meanwhile (409): nothing to stop
                pl.api("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "bench: measured"})
        out[str(m)] = {
            "enroll_seconds": round(enroll_s, 1),
            "warm_seconds": round(warm_s, 1),
            "not_warmed": cold,
            "poll_seconds": poll,
            "moving": moving,
            "waves": waves,
            "actions": rep["latency_ms"].get("actions"),
            "actions_count": sum(rep["status"].get("actions", {}).values()),
            "actions_per_s": round(
                sum(rep["status"].get("actions", {}).values()) / max(rep["run_seconds"], 1e-9), 1
            ),
            "rollout_status": (doc or {}).get("status"),
            "active": (doc or {}).get("by_status", {}).get("active"),
            "final_versions": rep["final_versions"],
            "db_bytes_per_device": round((after - before) / m),
            "errors": rep["errors"],
        }
    return out


# --- e. leader kill -9 -------------------------------------------------------------------------


def _leader_flag(doc: Any) -> bool | None:
    """The process's own "am I the ticker's leader" flag, wherever /healthz puts it."""
    if isinstance(doc, dict):
        if doc.get("ticker") in ("leader", "standby"):  # server/app.py: {"ticker": role}
            return bool(doc["ticker"] == "leader")
        for key, value in doc.items():
            if "leader" in key.lower() and isinstance(value, bool):
                return value
            found = _leader_flag(value)
            if found is not None:
                return found
    return None


def leader_takeover(pl: Plane, args: argparse.Namespace) -> dict[str, Any]:
    flags = [_leader_flag(httpx.get(u + "/healthz", timeout=5).json()) for u in pl.urls]
    if any(f is None for f in flags):
        return {"measured": False, "why": "leadership not available (/healthz has no leader flag)"}
    if flags.count(True) != 1:
        return {"measured": False, "why": f"expected exactly one leader, /healthz says {flags}"}
    leader = flags.index(True)
    other = pl.urls[1 - leader]
    n, k = min(args.rollout_devices, 500), args.accelerate
    token = pl.enrollment_token({"fleet": "kill"})
    cfg = sim_config(
        pl,
        None,
        token,
        prefix="kill",
        devices=n,
        poll=60.0,
        accelerate=k,
        concurrency=args.concurrency,
        telemetry=False,
    )
    cfg.servers = [other]  # the devices talk to the survivor
    sim = Simulator(cfg)
    asyncio.run(sim.enroll())
    killed: dict[str, float] = {}

    def apply_then_kill() -> str | None:
        rid = pl.apply("kill", staged_spec("kill", "1.0.0", [10.0, 100.0], 600.0 / k))
        time.sleep(1.0)
        pl.procs[leader].send_signal(signal.SIGKILL)
        killed["at"] = time.monotonic()
        return rid

    async def run() -> tuple[str | None, dict[str, Any], dict[str, Any] | None]:
        async def takeover() -> None:
            while "at" not in killed:
                await asyncio.sleep(0.1)
            while time.monotonic() - killed["at"] < 60:
                doc = await asyncio.to_thread(
                    lambda: httpx.get(other + "/healthz", timeout=5).json()
                )
                if _leader_flag(doc):
                    killed["takeover"] = time.monotonic() - killed["at"]
                    return
                await asyncio.sleep(0.1)

        task = asyncio.create_task(takeover())
        result = await rollout_run(pl, sim, apply_then_kill, 300)
        await task
        return result

    pl.urls = [other]
    _, rep, doc = asyncio.run(run())
    return {
        "measured": True,
        "takeover_seconds": None if "takeover" not in killed else round(killed["takeover"], 2),
        "rollout_status": (doc or {}).get("status"),
        "final_versions": rep["final_versions"],
        "devices": n,
    }


# --- report --------------------------------------------------------------------------------


def verdicts(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, met/MISSED/not measured) rows."""
    rows: list[tuple[str, str, str]] = []

    def row(name: str, measured: str, ok: bool | str | None) -> None:
        verdict = (
            ok
            if isinstance(ok, str)
            else "not measured"
            if ok is None
            else "met"
            if ok
            else "MISSED"
        )
        rows.append((name, measured, verdict))

    a = res.get("a")
    if a:
        s = a["server"]
        row(
            f"a. idle check-ins >= 1,667/s ({a['devices']} devices x {a['poll_seconds']} s poll "
            f"= the load of 100k at 60 s; {a['servers']} API processes, PostgreSQL)",
            f"{s['checkins_per_s']:.0f}/s (offered {s['offered_checkins_per_s']:.0f}/s)",
            s["checkins_per_s"] >= FLEET_100K_PER_S * 0.98,
        )
        row(
            "a. idle check-in p99 <= 250 ms",
            f"{s['checkin_p99_ms']} ms",
            (s["checkin_p99_ms"] or 1e9) <= 250,
        )
        row(
            "a. idle check-ins: 0 errors",
            f"{s['error_count']} {s['errors']}",
            s["error_count"] == 0,
        )
        if "server_2x" in a:
            h = a["server_2x"]
            row(
                "a. headroom: the same fleet polling twice as often (reported)",
                f"{h['checkins_per_s']:.0f}/s of {h['offered_checkins_per_s']:.0f}/s offered, "
                f"p99 {h['checkin_p99_ms']} ms, {h['error_count']} errors",
                "reported",
            )
        c1, c2 = a["ceiling_same_rate"], a["ceiling_max"]
        row(
            "a. simulator ceiling (canned responder)",
            f"{c1['checkins_per_s']:.0f}/s p99 {c1['checkin_p99_ms']} ms at the same rate; "
            f"{c2['checkins_per_s']:.0f}/s at 20,000/s offered",
            c2["checkins_per_s"] >= FLEET_100K_PER_S,
        )
    b = res.get("b")
    if b:
        for k, v in b["checkins"].items():
            if "full_path" in k:
                row(
                    f"b. full-path check-ins {k.split('_')[0]} >= 0.5x bare FastAPI",
                    f"{v:.3f}x",
                    v >= 0.5,
                )
        for k, v in b["telemetry"].items():
            row(f"b. telemetry ingestion {k} >= 0.5x bare gzip endpoint", f"{v:.3f}x", v >= 0.5)
    c = res.get("c")
    if c:
        f, g = c["first"], c["failing"]
        waves = ", ".join(f"{w['wave']} {w['seconds']} s" for w in f["waves"])
        row(
            f"c. staged rollout 1/10/50/100 % over {c['devices']} devices (x{c['accelerate']:g} clock)",
            f"{f['status']} in {f['seconds']} s ({waves}); versions {f['final_versions']}",
            f["status"] == "succeeded" and f["final_versions"] == {"1.0.0": c["devices"]},
        )
        if c.get("enroll_seconds") is not None:
            row(
                f"c. enrolling the {c['devices']:,} devices (2 API processes)",
                f"{c['enroll_seconds']} s, {c['enroll_per_s']}/s",
                "reported",
            )
        row(
            "c. every device accounted for",
            f"{f['accounted']} of {c['devices']}",
            f["accounted"] == c["devices"],
        )
        row(
            "c. no device told two targets",
            str(f["devices_told_multiple_targets"]),
            f["devices_told_multiple_targets"] == 0,
        )
        row(
            "c. failing canary rolled back before any device outside it moved",
            f"{g['status']} (first rollout {f['status']} when applied); canary {g['canary']}, "
            f"told {g['told_bad_version']} "
            f"({g['told_outside_canary']} outside), exposure {g['ran_bad_version']} ran it",
            g["status"] == "rolled-back" and g["told_outside_canary"] == 0,
        )
    d = res.get("d")
    if d:
        sizes = sorted(d, key=int)
        p50 = {m: (d[m]["actions"] or {}).get("p50") for m in sizes}
        flat = None
        if all(p50.values()) and len(sizes) > 1:
            flat = p50[sizes[-1]] <= 2 * p50[sizes[0]]  # type: ignore[operator]
        row(
            f"d. server time per device report flat (<= 2x) over {', '.join(sizes)} devices "
            f"({d[sizes[0]].get('moving')} moving at each size)",
            ", ".join(
                f"{m}: p50 {p50[m]} ms, p99 {(d[m]['actions'] or {}).get('p99')} ms "
                f"({d[m].get('actions_per_s')} reports/s, a poll every {d[m].get('poll_seconds')} s)"
                for m in sizes
            ),
            flat,
        )
        row(
            "d. database size per enrolled device (PostgreSQL; 1 rollout, "
            f"{d[sizes[0]].get('moving')} moved)",
            ", ".join(f"{m}: {d[m]['db_bytes_per_device']:,} B" for m in sizes),
            None if not sizes else True,
        )
    e = res.get("e")
    if e:
        if not e["measured"]:
            row(
                "e. leader kill -9: another process takes the ticker within 10 s",
                f"not measured: {e['why']}",
                None,
            )
        else:
            t = e["takeover_seconds"]
            row(
                "e. leader kill -9: another process takes the ticker within 10 s",
                f"{t} s",
                t is not None and t <= 10,
            )
            row(
                "e. the rollout finishes after the kill",
                f"{e['rollout_status']} {e['final_versions']}",
                e["rollout_status"] == "succeeded",
            )
    f = res.get("f")
    if f:
        a1 = f["async"][-1]
        row(
            f"f. apply over {f['devices']:,} devices answers before it is settled "
            "(Prefer: respond-async)",
            f"answered in {a1['answer_ms']} ms, settled in {a1['settled_s']} s "
            f"(first apply: {f['async'][0]['answer_ms']} ms / {f['async'][0]['settled_s']} s); "
            f"one synchronous request {f['sync']['seconds']} s; unchanged {f['unchanged_ms']} ms",
            max(r["answer_ms"] for r in f["async"]) < 1000 and not f["unchanged_changed"],
        )
    return rows


def shared_plane(
    work: Path,
    env: dict[str, str],
    skip: set[str],
    section: Callable[[str, Callable[[], dict[str, Any]]], None],
    args: argparse.Namespace,
) -> None:
    """Sections a, c, d, f and e on one PostgreSQL with two API processes (e kills one: last)."""
    with postgres_cluster() as db_url, plane(work, db_url, 2, env) as pl:
        if not {"c", "d", "e", "f"} <= skip:
            for version, path in bundles(work).items():
                address = pl.urls[0].removeprefix("http://")
                push(path, f"oci://{address}/{MODEL}:{version}", token=pl.admin)
        section("a", lambda: idle_fleet(pl, args))
        section("c", lambda: staged_rollout(pl, args))
        section("d", lambda: report_cost(pl, args))
        section("f", lambda: apply_cost(pl, args))
        section("e", lambda: leader_takeover(pl, args))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smaller fleets, shorter runs (make bench)"
    )
    ap.add_argument("--full", action="store_true", help="100,000 devices in (a), (c) and (d): slow")
    ap.add_argument("--devices", type=int, help="(a) devices (default 10,000; quick 3,000)")
    ap.add_argument(
        "--rollout-devices",
        type=int,
        help="(c) devices (default 2,000; quick 300; full 100,000)",
    )
    ap.add_argument(
        "--soak",
        type=float,
        help="(c) seconds each wave soaks (default 10 min on the accelerated clock, <= 60 s)",
    )
    ap.add_argument("--report-sizes", help="(d) fleet sizes, comma list (default 1000,10000)")
    ap.add_argument(
        "--accelerate", type=float, default=None, help="(c, e) clock factor (default 60; quick 30)"
    )
    ap.add_argument("--seconds", type=float, help="(a) measured seconds (default 15; quick 8)")
    ap.add_argument("--concurrency", type=int, default=64, help="connections per API process")
    ap.add_argument(
        "--apply-devices", type=int, help="(f) devices (default 20,000; quick 2,000; full 100,000)"
    )
    ap.add_argument("--skip", default="", help="comma list of sections: a,b,c,d,e,f")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    args.devices = args.devices or (100_000 if args.full else 3_000 if args.quick else 10_000)
    args.rollout_devices = args.rollout_devices or (
        100_000 if args.full else 300 if args.quick else 2_000
    )
    args.apply_devices = args.apply_devices or (
        100_000 if args.full else 2_000 if args.quick else 20_000
    )
    args.accelerate = args.accelerate or (30.0 if args.quick else 60.0)
    sizes = args.report_sizes or ("1000,10000,100000" if args.full else "1000,10000")
    args.report_sizes = [int(s) for s in sizes.split(",") if s]
    args.seconds = args.seconds or (8.0 if args.quick else 15.0)
    work = scratch("slmops-bench-scale-")
    res: dict[str, Any] = {
        "scale": {
            "idle_devices": args.devices,
            "rollout_devices": args.rollout_devices,
            "report_sizes": args.report_sizes,
            "accelerate": args.accelerate,
            "quick": args.quick,
        }
    }
    # the server's own poll setting stays at 60 s (it decides how often an idle check-in writes
    # last_seen); the simulated devices poll at their own (accelerated) interval
    env = {"SLMOPS_ROLLOUT_TICK_SECONDS": "0.2"}

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name in skip:
            return
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as exc:  # one broken section must not hide the others' numbers
            res[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:1000]
            keep(work)
        print(f"[{name}] {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

    if not {"a", "c", "d", "e", "f"} <= skip:
        shared_plane(work, env, skip, section, args)
    section("b", lambda: bare_ratios(work, args))
    res["targets"] = [list(r) for r in verdicts(res)]
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    sc = res["scale"]
    print(
        f"fleet scale ({'quick' if args.quick else 'full' if args.full else 'default'}): "
        f"(a) {sc['idle_devices']:,} devices, (c) {sc['rollout_devices']:,} devices at "
        f"x{sc['accelerate']:g}, (d) {', '.join(f'{m:,}' for m in sc['report_sizes'])} devices"
    )
    for key in [k for k in res if k.endswith("_error")]:
        print(f"  section {key[0]} failed: {res[key]}")
    width = max((len(r[0]) for r in res["targets"]), default=40)
    for name, measured, verdict in res["targets"]:
        print(f"  {name:{width}}  {verdict:12}  {measured}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
