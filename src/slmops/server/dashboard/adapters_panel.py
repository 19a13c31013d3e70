"""Which sites run which LoRA adapter: the fleet page's "Adapters" panel.

The truth is what each device last reported (``active.adapter`` of its check-in, see
``protocol/device.py`` ``ActiveAdapter``), not what a blueprint asks for: an operator wants to
see what actually serves, and a device whose adapter failed its health check keeps reporting the
previous one (or none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SITE_LABEL = "site"
NONE = "none"


def adapter_of(active: Mapping[str, Any] | None) -> str | None:
    """``name:version`` of the adapter loaded on top of the active model, or None."""
    adapter = (active or {}).get("adapter")
    if not isinstance(adapter, Mapping) or not adapter.get("name"):
        return None
    return f"{adapter['name']}:{adapter.get('version') or '?'}"


@dataclass
class AdapterRow:
    """One adapter (or ``none``): how many devices run it, at which sites."""

    adapter: str
    devices: int = 0
    sites: dict[str, int] = field(default_factory=dict)


def adapter_rows(devices: Iterable[tuple[str | None, Mapping[str, str]]]) -> list[AdapterRow]:
    """Group ``(adapter, labels)`` pairs by adapter; a device's site is its ``site`` label
    (``-`` when it has none). Adapters first by name, devices without one last."""
    rows: dict[str, AdapterRow] = {}
    for adapter, labels in devices:
        key = adapter or NONE
        row = rows.setdefault(key, AdapterRow(key))
        row.devices += 1
        site = labels.get(SITE_LABEL) or "-"
        row.sites[site] = row.sites.get(site, 0) + 1
    for row in rows.values():
        row.sites = dict(sorted(row.sites.items()))
    return sorted(rows.values(), key=lambda r: (r.adapter == NONE, r.adapter))
