"""Inline SVG charts drawn in Python: no JavaScript, no CDN, no matplotlib in the server.

Every function returns markup that is safe to embed (labels are escaped) and sized by its
``viewBox`` so CSS can scale it.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

PALETTE = ("#2f6fb5", "#e08a1e", "#3a9d5d", "#b5443b", "#7b5bb5", "#5a8f9c")


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def bar_chart(
    title: str, rows: Sequence[tuple[str, float | None]], unit: str = "", width: int = 560
) -> Markup:
    """Horizontal bars, one per labelled value; a missing value is drawn as "n/a"."""
    label_w, row_h, top = 190, 24, 28
    height = top + row_h * max(len(rows), 1) + 8
    values = [v for _, v in rows if v is not None]
    peak = max((abs(v) for v in values), default=0.0) or 1.0
    span = width - label_w - 80
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f'<text x="0" y="16" class="chart-title">{escape(title)}</text>',
    ]
    if not rows:
        parts.append(f'<text x="0" y="{top + 14}" class="muted">no data</text>')
    for i, (label, value) in enumerate(rows):
        y = top + i * row_h
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(label[:32])}</text>'
        )
        if value is None:
            parts.append(f'<text x="{label_w}" y="{y + 15}" class="muted">n/a</text>')
            continue
        w = max(1.0, span * abs(value) / peak)
        parts.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{color}"><title>{escape(label)}: {_fmt(value)} {escape(unit)}</title></rect>'
        )
        parts.append(
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{_fmt(value)} {escape(unit)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def wave_bars(total: int, target: int, moved: int, active: int, width: int = 420) -> Markup:
    """Three bars on one scale (the rollout's devices): planned, moved so far, active."""
    label_w, row_h = 70, 18
    span = width - label_w - 50
    scale = span / total if total else 0.0
    parts = [
        f'<svg class="wave-bars" role="img" viewBox="0 0 {width} {row_h * 3 + 4}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="target {target}, moved {moved}, '
        f'active {active} of {total}">'
    ]
    for i, (name, n, color) in enumerate(
        (("target", target, "#c9d6e8"), ("moved", moved, "#2f6fb5"), ("active", active, "#3a9d5d"))
    ):
        y = i * row_h + 2
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{name}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 2}" width="{span}" height="{row_h - 5}" fill="#f0f0f0"/>'
        )
        if n:
            parts.append(
                f'<rect x="{label_w}" y="{y + 2}" width="{max(1.0, n * scale):.1f}" '
                f'height="{row_h - 5}" fill="{color}"/>'
            )
        parts.append(f'<text x="{label_w + span + 6}" y="{y + 12}">{n}/{total}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
