"""Drift: is the field's output distribution still the one the model was evaluated on?

For each (model, version, variant, hardware class) with telemetry in the last ``window_s``, the
merged ``logprob`` and ``output_tokens`` histograms are compared with the baseline histograms of
that variant by the population stability index

    PSI = sum_i (q_i - p_i) * ln(q_i / p_i)

over the shared buckets, ``p`` the baseline proportions and ``q`` the field's. An empty bucket
would make the log infinite, so proportions below ``EPSILON`` (1e-4, i.e. 0.01%) are raised to
it first. Rule of thumb: PSI < 0.1 no shift, 0.1-0.2 moderate, > 0.2 (``THRESHOLD``) significant.
A comparison needs ``min_samples`` values in the field histogram (the baseline just has to be
non-empty); DP noise is clamped to 0 per bucket first.

The baseline is the bundle variant descriptor's ``baseline`` field
(``{"logprob": [counts...], "output_tokens": [counts...]}``), read defensively: a bundle
without it, or a descriptor type that has no such field, is skipped. Each raised alert is stored
(``alerts`` table, kind ``drift``); while an unacknowledged alert exists for the same model,
version, profile and statistic, no new one is raised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.protocol.telemetry import BOUNDS
from slmops.server.blueprints.document import ModelRef
from slmops.server.db.models import utcnow
from slmops.server.registry.store import BlobStore
from slmops.server.targets import resolve_target
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.rows import load
from slmops.server.telemetry.tables import AlertRow

EPSILON = 1e-4
THRESHOLD = 0.2
MIN_SAMPLES = 200
STATISTICS = ("logprob", "output_tokens")

Baselines = Callable[[str, str, str], Mapping[str, Sequence[float]] | None]
"""(model, version, variant) -> {"logprob": counts, "output_tokens": counts} or None."""


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """Population stability index of ``actual`` against ``expected`` (bucket counts)."""
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} baseline buckets vs {len(actual)} observed")
    e = [max(0.0, float(x)) for x in expected]
    a = [max(0.0, float(x)) for x in actual]
    te, ta = sum(e), sum(a)
    if te <= 0 or ta <= 0:
        raise ValueError("an empty histogram has no distribution to compare")
    total = 0.0
    for x, y in zip(e, a, strict=True):
        p, q = max(x / te, epsilon), max(y / ta, epsilon)
        total += (q - p) * math.log(q / p)
    return total


def baseline_of(descriptor: Any) -> dict[str, Sequence[float]] | None:
    """The ``baseline`` of a variant descriptor, whether it is a field, an extra or a dict key."""
    raw = getattr(descriptor, "baseline", None)
    if raw is None and isinstance(descriptor, dict):
        raw = descriptor.get("baseline")
    if raw is None:
        extra = getattr(descriptor, "model_extra", None) or {}
        raw = extra.get("baseline")
    if raw is None:
        return None
    if hasattr(raw, "model_dump"):
        raw = raw.model_dump()
    if not isinstance(raw, dict):
        return None
    out: dict[str, Sequence[float]] = {}
    for name in STATISTICS:
        counts = raw.get(name)
        if isinstance(counts, list | tuple) and len(counts) == len(BOUNDS[name]) + 1:
            out[name] = [float(c) for c in counts]
    return out or None


def bundle_baselines(session: Session, store: BlobStore) -> Baselines:
    """Baselines read from the pushed bundles' variant descriptors (cached per call site)."""
    cache: dict[tuple[str, str, str], Mapping[str, Sequence[float]] | None] = {}

    def get(model: str, version: str, variant: str) -> Mapping[str, Sequence[float]] | None:
        key = (model, version, variant)
        if key not in cache:
            target = resolve_target(session, store, ModelRef(name=model, version=version))
            found = None
            if not isinstance(target, str):
                for descriptor, _digest in target.variants:
                    if descriptor.name == variant:
                        found = baseline_of(descriptor)
            cache[key] = found
        return cache[key]

    return get


def check_drift(
    session: Session,
    store: BlobStore,
    *,
    now: float | None = None,
    window_s: float = 86400.0,
    threshold: float = THRESHOLD,
    min_samples: int = MIN_SAMPLES,
    baselines: Baselines | None = None,
) -> list[AlertRow]:
    """Compare the last ``window_s`` of field telemetry with the baselines; store and return
    the alerts raised now. Commits."""
    now = time.time() if now is None else now
    get = baselines or bundle_baselines(session, store)
    merged: dict[tuple[str, str, str, str], aggregate.Acc] = {}
    for row in load(session, since=now - window_s, until=None):
        if not (row.model and row.version and row.variant):
            continue
        key = (row.model, row.version, row.variant, row.profile or "unknown")
        merged[key] = aggregate.merge(merged.get(key) or aggregate.empty(), row.acc)
    raised: list[AlertRow] = []
    for (model, version, variant, profile), acc in sorted(merged.items()):
        base = get(model, version, variant)
        if not base:
            continue
        for name in STATISTICS:
            hist = acc["histograms"].get(name)
            if name not in base or hist is None:
                continue
            samples = sum(max(0.0, c) for c in hist["counts"])
            if samples < min_samples or sum(base[name]) <= 0:
                continue
            value = psi(base[name], hist["counts"])
            if value <= threshold or _open_alert(session, model, version, profile, name):
                continue
            alert = AlertRow(
                kind="drift",
                model=model,
                version=version,
                profile=profile,
                statistic=f"psi:{name}",
                value=value,
                threshold=threshold,
                details={
                    "variant": variant,
                    "samples": samples,
                    "window_s": window_s,
                    "observed": hist["counts"],
                    "baseline": list(base[name]),
                    "noised": name in acc.get("noised", []),
                },
                created_at=utcnow(),
                acknowledged=False,
            )
            session.add(alert)
            raised.append(alert)
    session.commit()
    return raised


def _open_alert(session: Session, model: str, version: str, profile: str, name: str) -> bool:
    return (
        session.scalar(
            select(AlertRow.id).where(
                AlertRow.kind == "drift",
                AlertRow.model == model,
                AlertRow.version == version,
                AlertRow.profile == profile,
                AlertRow.statistic == f"psi:{name}",
                AlertRow.acknowledged.is_(False),
            )
        )
        is not None
    )
