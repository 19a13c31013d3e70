"""Fleet telemetry queries: merge windows and group them (the dashboard's and the API's view).

``summarize`` is the contract the dashboard calls. Each returned dict is one group:

- one key per ``group_by`` entry, named exactly as given, with the group's value (None when
  the windows did not say, e.g. no version);
- ``devices``: distinct devices in the group; ``windows``: windows merged;
- ``requests``, ``errors`` (sum of all kinds), ``errors_by_kind``, ``error_rate``
  (errors / requests);
- ``ttft_p50_ms``, ``ttft_p95_ms``, ``latency_p50_ms``, ``latency_p95_ms``: from the merged
  histograms by linear interpolation inside the bucket (``aggregate.py`` documents the edges);
- ``tokens_per_s``: mean decode tokens/s (sum / count of the ``decode_tps`` histogram);
- ``output_tokens_mean`` (per request, from the ``output_tokens`` histogram), ``prompt_tokens``
  and ``output_tokens`` totals;
- ``logprob_mean``, ``entropy_mean``: means weighted by the tokens behind each window
  (``quality_tokens``, which is also given);
- ``feedback_up``, ``feedback_down``, ``health_ok``, ``health_failed``, ``peak_rss_bytes`` (max);
- ``noised``: figures that some merged window had DP noise added to (so not exact), and
  ``epsilon``, the largest per-window budget among them.

Figures with no data are None. Ratios are None when their denominator is 0.

Group keys: ``model``, ``version``, ``variant``, ``profile`` (hardware class), ``rollout_id``,
``adapter`` (the LoRA adapter served over the model, ``name:version``; None: the model alone),
``device_id``, ``label:<key>`` (the device's effective labels *now*, not when it sent the window)
and ``cohort:<rollout id>`` (``canary`` or ``baseline`` as ``cohorts.py`` defines them; windows in
neither cohort are left out). ``where`` takes the same keys with the value to keep. ``since`` and
``until`` (epoch seconds) keep windows with ``since <= start < until``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from slmops.core.errors import UserInputError
from slmops.server.db.models import Device
from slmops.server.rollouts.tables import Rollout
from slmops.server.telemetry import aggregate
from slmops.server.telemetry.cohorts import RolloutCohorts
from slmops.server.telemetry.rows import COLUMNS, Row, load

GROUP_KEYS = (*COLUMNS, "label:<key>", "cohort:<rollout id>")

Getter = Callable[[Row], str | None]


def summarize(
    session: Session,
    *,
    group_by: list[str],
    since: float | None = None,
    until: float | None = None,
    where: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Merged telemetry per group (keys in the module doc), sorted by group values.

    With a ``cohort:`` key the range's rows are read first, then the rollout records of the
    devices they name (in chunks), never every device row of the rollout."""
    cohorts: list[RolloutCohorts] = []
    getters = {key: _getter(session, key, cohorts) for key in group_by}
    filters = {key: (_getter(session, key, cohorts), value) for key, value in (where or {}).items()}
    groups: dict[tuple[str | None, ...], tuple[aggregate.Acc, set[str]]] = {}
    rows: Iterable[Row] = load(session, since=since, until=until, where=where)
    if cohorts:
        rows = list(rows)
        for lookup in cohorts:
            lookup.prefetch({r.device_id for r in rows})
    for row in rows:
        if any(get(row) != value for get, value in filters.values()):
            continue
        key = tuple(get(row) for get in getters.values())
        if any(k.startswith("cohort:") and v is None for k, v in zip(group_by, key, strict=True)):
            continue
        acc, devices = groups.get(key) or (aggregate.empty(), set())
        devices.add(row.device_id)
        groups[key] = (aggregate.merge(acc, row.acc), devices)
    out: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: tuple((v is None, v or "") for v in k)):
        acc, devices = groups[key]
        doc: dict[str, Any] = dict(zip(group_by, key, strict=True))
        doc["devices"] = len(devices)
        doc.update(aggregate.figures(acc))
        out.append(doc)
    return out


def _getter(session: Session, key: str, cohorts: list[RolloutCohorts]) -> Getter:
    if key in COLUMNS:
        return lambda row: row.dim(key)
    if key.startswith("label:") and len(key) > len("label:"):
        label = key.removeprefix("label:")
        labels = {d.device_id: d.effective_labels for d in session.scalars(select(Device))}
        return lambda row: labels.get(row.device_id, {}).get(label)
    if key.startswith("cohort:"):
        rollout_id = key.removeprefix("cohort:")
        found = session.get(Rollout, rollout_id)
        if found is None:
            raise UserInputError(
                f"no rollout {rollout_id!r}", where=key, hint="name a rollout id: cohort:<id>"
            )
        cohort = RolloutCohorts(session, found)
        cohorts.append(cohort)

        def get(row: Row) -> str | None:
            which = cohort(row.device_id, row.model, row.version, row.profile)
            return which.value if which is not None else None

        return get
    raise UserInputError(
        f"cannot group or filter by {key!r}",
        where=key,
        hint="use one of: " + ", ".join(GROUP_KEYS),
    )
