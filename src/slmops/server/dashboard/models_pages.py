"""Dashboard pages for models (versions, channels, lineage, eval-report charts) and telemetry.

A version page shows what ``GET /api/v1/models/{name}/versions/{version}`` computes (the same
function is called), plus the chart PNGs carried as layers of the bundle manifest, served from
the content-addressed store only when the digest is such a layer of that version.

Telemetry comes from ``slmops.server.telemetry.query.summarize``, imported when the page is
asked for: without that module (or without data) the page says "no telemetry yet".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from slmops.bundle.media import (
    ANN_TITLE,
    ARTIFACT_BUNDLE,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    MT_INDEX,
    MT_PNG,
)
from slmops.bundle.oci_ref import Desc, OciContentError, load_manifest
from slmops.server.api.deps import ServicesDep, SessionDep
from slmops.server.dashboard.auth import UserDep
from slmops.server.dashboard.render import render
from slmops.server.dashboard.svg import bar_chart
from slmops.server.registry import model_routes
from slmops.server.registry.store import BlobStore, StoreError
from slmops.server.registry.tables import RegistryChannel, RegistryTag

router = APIRouter(prefix="/ui", include_in_schema=False)
MAX_CHART_BYTES = MAX_CONFIG_BYTES
KNOWN_VERSION_KEYS = {"name", "version", "digest", "variants", "bundle", "signatures"}
KNOWN_VERSION_KEYS |= {"total_bytes", "unique_bytes", "problems"}
WINDOWS = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0, "all": 0.0}
FIGURES = (
    ("requests", "requests", ""),
    ("latency_p95_ms", "p95 latency", "ms"),
    ("ttft_p95_ms", "p95 time to first token", "ms"),
    ("tokens_per_s", "decode tokens/s", "tok/s"),
    ("logprob_mean", "mean token logprob", ""),
    ("error_rate", "error rate", ""),
)


@dataclass(frozen=True)
class Layer:
    title: str
    media_type: str
    digest: str
    size: int


def bundle_layers(store: BlobStore, index_digest: str) -> list[Layer]:
    """The report layers (json, html, md, chart PNGs) of a version's bundle manifest."""
    data = store.read_small(index_digest, MAX_MANIFEST_BYTES)
    _, children, _ = load_manifest(data, Desc(MT_INDEX, index_digest, len(data)))
    for child in children:
        raw = store.read_small(child.digest, MAX_MANIFEST_BYTES)
        obj, _, _ = load_manifest(raw, child)
        if child.artifact_type != ARTIFACT_BUNDLE and obj.get("artifactType") != ARTIFACT_BUNDLE:
            continue
        out = []
        for layer in obj.get("layers") or []:
            if isinstance(layer, dict):
                ann = layer.get("annotations") or {}
                out.append(
                    Layer(
                        title=str(ann.get(ANN_TITLE, layer.get("digest", ""))),
                        media_type=str(layer.get("mediaType", "")),
                        digest=str(layer.get("digest", "")),
                        size=int(layer.get("size") or 0),
                    )
                )
        return out
    return []


def _models(session: SessionDep) -> list[dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for row in session.scalars(select(RegistryTag).order_by(RegistryTag.repository)):
        m = models.setdefault(row.repository, {"name": row.repository, "versions": []})
        if not model_routes._REFERRERS_TAG.match(row.tag):
            m["versions"].append({"tag": row.tag, "digest": row.digest, "at": row.updated_at})
    channels: dict[tuple[str, str], list[str]] = {}
    for ch in session.scalars(select(RegistryChannel).order_by(RegistryChannel.channel)):
        channels.setdefault((ch.repository, ch.version), []).append(ch.channel)
    for m in models.values():
        m["versions"].sort(key=lambda v: v["at"], reverse=True)
        for v in m["versions"]:
            v["channels"] = channels.get((m["name"], v["tag"]), [])
    return list(models.values())


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, user: UserDep, session: SessionDep) -> Response:
    return render(request, "models.html", user, models=_models(session))


@router.get("/models/{name:path}/versions/{version}", response_class=HTMLResponse)
def version_page(
    name: str,
    version: str,
    request: Request,
    user: UserDep,
    session: SessionDep,
    services: ServicesDep,
) -> Response:
    try:
        v = model_routes.read_version(name, version, session, services, user.token)
    except HTTPException:
        return render(request, "error.html", user, 404, message=f"{name} has no version {version}")
    store = services.store
    problems = list(v.problems)
    try:
        layers = bundle_layers(store, v.digest)
    except (StoreError, OciContentError) as exc:
        layers, problems = [], [*problems, f"bundle manifest: {exc}"]
    doc = v.model_dump(mode="json", by_alias=True)
    extra = {k: val for k, val in doc.items() if k not in KNOWN_VERSION_KEYS}
    channels = session.scalars(
        select(RegistryChannel.channel).where(
            RegistryChannel.repository == name, RegistryChannel.version == version
        )
    ).all()
    return render(
        request,
        "version.html",
        user,
        v=v,
        channels=list(channels),
        layers=layers,
        charts=[x for x in layers if x.media_type == MT_PNG],
        problems=problems,
        lineage={k: json.dumps(val, indent=2, default=str) for k, val in extra.items()},
    )


@router.get("/models/{name:path}/versions/{version}/charts/{digest}")
def chart(
    name: str, version: str, digest: str, user: UserDep, session: SessionDep, services: ServicesDep
) -> Response:
    """A chart PNG of this version's eval report (only digests that are such layers)."""
    tag = session.scalar(
        select(RegistryTag).where(RegistryTag.repository == name, RegistryTag.tag == version)
    )
    store = services.store
    try:
        layers = bundle_layers(store, tag.digest) if tag else []
        if not any(x.digest == digest and x.media_type == MT_PNG for x in layers):
            return Response("no such chart", status_code=404, media_type="text/plain")
        data = store.read_small(digest, MAX_CHART_BYTES)
    except (StoreError, OciContentError) as exc:
        return Response(f"chart unavailable: {exc}", status_code=404, media_type="text/plain")
    return Response(
        data,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=86400, immutable"},
    )


def telemetry_rows(
    session: SessionDep, group_by: list[str], since: float | None
) -> tuple[list[dict[str, Any]], str | None]:
    """``summarize`` rows, or why there are none (module absent, query failed)."""
    try:
        from slmops.server.telemetry.query import summarize
    except ImportError:
        return [], "no telemetry yet: the telemetry module is not installed on this server"
    try:
        rows = summarize(session, group_by=group_by, since=since)
    except Exception as exc:  # a half-built or migrating telemetry store must not break the UI
        return [], f"no telemetry yet: the query failed ({type(exc).__name__}: {exc})"
    return list(rows), None if rows else "no telemetry yet for this window"


@router.get("/telemetry", response_class=HTMLResponse)
def telemetry_page(
    request: Request, user: UserDep, session: SessionDep, window: str = "24h"
) -> Response:
    window = window if window in WINDOWS else "24h"
    since = time.time() - WINDOWS[window] if WINDOWS[window] else None
    group_by = ["version", "profile"]
    rows, note = telemetry_rows(session, group_by, since)

    def label(row: dict[str, Any]) -> str:
        return " · ".join(str(row.get(k, "?")) for k in group_by)

    charts = []
    for key, title, unit in FIGURES:
        if any(key in r for r in rows):
            values = [(label(r), _number(r.get(key))) for r in rows]
            charts.append(bar_chart(f"{title} per version · profile", values, unit))
    columns = [k for k, _, _ in FIGURES if any(k in r for r in rows)]
    return render(
        request,
        "telemetry.html",
        user,
        rows=rows,
        note=note,
        charts=charts,
        group_by=group_by,
        columns=columns,
        window=window,
        windows=list(WINDOWS),
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
