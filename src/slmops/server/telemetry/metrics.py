"""GET /metrics: Prometheus text exposition, computed from the database at scrape time.

A custom collector reads the tables on every scrape and keeps nothing in the process, so every
API process serving the same database answers the same numbers, and a restart loses nothing
(ingestion counters live in ``telemetry_counters``).

Families (all prefixed ``slmops_``): ``devices{profile}`` fleet size per hardware class,
``devices_by_version{model,version}`` what devices report active, ``devices_seen_recently``
(checked in within 5 minutes), ``rollouts{status}``, ``telemetry_latency_seconds`` and
``telemetry_ttft_seconds``: summaries per ``{version,adapter,profile}`` over the *last hour*
(quantile 0.5 and 0.95 from merged buckets, ``_count`` and ``_sum`` of that hour; so unlike a
process summary they are not cumulative, which the 1-hour quantiles are meant for),
``telemetry_requests_total`` / ``telemetry_errors_total{version,adapter}`` (everything still in
the hourly roll-up), and ``telemetry_{batches,windows,duplicate_batches,dropped_windows}_total``.

Authentication: none. The figures are fleet aggregates (no device ids, labels or secrets) and
``adapter`` is the LoRA adapter served over the model (``name:version``), ``""`` for the model
alone (an empty label is an absent one to PromQL, so ``{version="1.0"}`` selectors still match).
The server listens on loopback by default (``settings.py``), which is where a Prometheus next to
it scrapes; a deployment that exposes the API should keep ``/metrics`` off its proxy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from slmops.server.db.models import Device, utcnow
from slmops.server.db.session import Database
from slmops.server.rollouts.tables import Rollout
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.rows import load
from slmops.server.telemetry.store import UNKNOWN_CLASS, flush_counters
from slmops.server.telemetry.tables import TelemetryCounter, TelemetryHourlyRow

router = APIRouter(tags=["health"])
RECENT = timedelta(minutes=5)
LATENCY_WINDOW_S = 3600.0
COUNTER_HELP = {
    "batches": "telemetry batches stored",
    "windows": "telemetry windows stored",
    "duplicate_batches": "retried telemetry batches answered as duplicates",
    "dropped_windows": "windows devices reported dropping before delivery",
}


class DatabaseCollector(Collector):
    """Reads the fleet, rollouts and telemetry from one session at collect time."""

    def __init__(self, session: Session, now: float | None = None) -> None:
        self.session = session
        self.now = time.time() if now is None else now

    def collect(self) -> Iterator[Metric]:
        s = self.session
        fleet = GaugeMetricFamily("slmops_devices", "enrolled devices", labels=["profile"])
        for profile, n in s.execute(select(Device.profile, func.count()).group_by(Device.profile)):
            fleet.add_metric([profile or UNKNOWN_CLASS], n)
        yield fleet

        by_version: dict[tuple[str, str], int] = {}
        for (active,) in s.execute(select(Device.active)):
            if active and active.get("name"):
                key = (str(active["name"]), str(active.get("version") or ""))
                by_version[key] = by_version.get(key, 0) + 1
        versions = GaugeMetricFamily(
            "slmops_devices_by_version",
            "devices by the model version they report active",
            labels=["model", "version"],
        )
        for (model, version), n in sorted(by_version.items()):
            versions.add_metric([model, version], n)
        yield versions

        recent = s.scalar(
            select(func.count()).select_from(Device).where(Device.last_seen >= utcnow() - RECENT)
        )
        yield GaugeMetricFamily(
            "slmops_devices_seen_recently",
            "devices that checked in within 5 minutes",
            value=recent or 0,
        )

        rollouts = GaugeMetricFamily("slmops_rollouts", "rollouts by status", labels=["status"])
        for status, n in s.execute(select(Rollout.status, func.count()).group_by(Rollout.status)):
            rollouts.add_metric([status], n)
        yield rollouts

        yield from self._latency()
        yield from self._totals()

        for name, value in s.execute(select(TelemetryCounter.name, TelemetryCounter.value)):
            if name in COUNTER_HELP:
                yield CounterMetricFamily(
                    f"slmops_telemetry_{name}", COUNTER_HELP[name], value=value
                )

    def _latency(self) -> Iterator[Metric]:
        merged: dict[tuple[str, str, str], aggregate.Acc] = {}
        for row in load(self.session, since=self.now - LATENCY_WINDOW_S, until=None):
            key = (row.version or "", row.adapter or "", row.profile or UNKNOWN_CLASS)
            merged[key] = aggregate.merge(merged.get(key) or aggregate.empty(), row.acc)
        for hist, name in (("latency_ms", "latency"), ("ttft_ms", "ttft")):
            family = Metric(
                f"slmops_telemetry_{name}_seconds",
                f"{name} over the last hour: quantiles from merged histogram buckets",
                "summary",
            )
            for (version, adapter, profile), acc in sorted(merged.items()):
                h = acc["histograms"].get(hist)
                if h is None or h["count"] <= 0:
                    continue
                labels = {"version": version, "adapter": adapter, "profile": profile}
                for q in (0.5, 0.95):
                    value = aggregate.quantile(hist, h["counts"], q)
                    if value is not None:
                        family.add_sample(family.name, {**labels, "quantile": str(q)}, value / 1000)
                family.add_sample(family.name + "_count", labels, h["count"])
                family.add_sample(family.name + "_sum", labels, h["sum"] / 1000)
            yield family

    def _totals(self) -> Iterator[Metric]:
        labels = ["version", "adapter"]
        requests = CounterMetricFamily(
            "slmops_telemetry_requests", "requests served, by version and adapter", labels=labels
        )
        errors = CounterMetricFamily(
            "slmops_telemetry_errors", "requests that failed, by version and adapter", labels=labels
        )
        sums: dict[tuple[str, str], list[float]] = {}
        h = TelemetryHourlyRow
        for version, adapter, agg in self.session.execute(
            select(h.version, h.adapter, h.aggregate)
        ):
            total = sums.setdefault((version, adapter), [0.0, 0.0])
            total[0] += float(agg.get("requests", 0))
            total[1] += float(agg.get("errors", 0))
        for key, (req, err) in sorted(sums.items()):
            requests.add_metric(list(key), req)
            errors.add_metric(list(key), err)
        yield requests
        yield errors


def exposition(db: Database) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    with db.sessions() as session:
        flush_counters(session)  # this process's counts are exact at scrape time
        registry.register(DatabaseCollector(session))
        return generate_latest(registry)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (no authentication: see the module doc)."""
    body = await run_in_threadpool(exposition, request.app.state.db)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
