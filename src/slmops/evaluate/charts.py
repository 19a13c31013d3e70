"""Per-profile PNG charts: quality against size and against projected decode speed.

Each chart shows every variant (filled when it fits the profile, hollow grey when it does not),
the Pareto front over all of them (the trade-offs worth considering), the profile's budget as a
dashed line, and the chosen variant as a labelled star. matplotlib is imported inside the
functions (the evaluate extra has it; the agent never loads this module) and only the Agg canvas
is used, through `Figure` rather than pyplot, so no global state or display is touched.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slmops.core.atomic import write_bytes_atomic
from slmops.core.units import MIB
from slmops.evaluate.schema import EvalReport
from slmops.evaluate.select import device_decode_tps, pareto_front

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIT_COLOR = "#1f77b4"
MISS_COLOR = "#9a9a9a"
STAR_COLOR = "#d62728"
FRONT_COLOR = "#ff7f0e"


@dataclass
class _Point:
    name: str
    x: float
    kld: float
    fits: bool


def _wide(values: list[float]) -> bool:
    pos = [v for v in values if v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) > 50


def _draw(
    ax: Axes,
    points: list[_Point],
    chosen: str | None,
    *,
    maximize_x: bool,
    kld_budget: float,
) -> None:
    # pareto_front minimises its first coordinate, so KLD goes first and x second.
    front = set(pareto_front([(p.name, p.kld, p.x) for p in points], maximize_y=maximize_x))
    line = sorted((p for p in points if p.name in front), key=lambda p: p.x)
    if len(line) > 1:
        ax.plot(
            [p.x for p in line],
            [p.kld for p in line],
            "-",
            color=FRONT_COLOR,
            lw=1.2,
            zorder=1,
            label="Pareto front",
        )
    for fits in (True, False):
        pts = [p for p in points if p.fits == fits]
        if pts:
            ax.scatter(
                [p.x for p in pts],
                [p.kld for p in pts],
                s=40,
                facecolors=FIT_COLOR if fits else "none",
                edgecolors=FIT_COLOR if fits else MISS_COLOR,
                zorder=2,
                label="fits" if fits else "does not fit",
            )
    for p in points:
        if p.name == chosen:
            continue  # labelled once, in bold, below
        ax.annotate(
            p.name,
            (p.x, p.kld),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
            color="#333333" if p.fits else MISS_COLOR,
            parse_math=False,  # a '$' in a variant name must not switch to mathtext
        )
    star = next((p for p in points if p.name == chosen), None)
    if star is not None:
        ax.scatter(
            [star.x], [star.kld], marker="*", s=260, color=STAR_COLOR, zorder=3, label="chosen"
        )
        ax.annotate(
            f"chosen: {star.name}",
            (star.x, star.kld),
            textcoords="offset points",
            xytext=(8, 8),
            fontsize=8,
            fontweight="bold",
            color=STAR_COLOR,
            parse_math=False,
        )
    ax.axhline(
        kld_budget, color=STAR_COLOR, ls="--", lw=0.8, alpha=0.6, label=f"max KLD {kld_budget:g}"
    )
    klds = [p.kld for p in points] + [kld_budget]
    if _wide(klds):
        if min(klds) > 0:
            ax.set_yscale("log")
        else:  # a KLD of exactly 0 (the reference itself) has no place on a log axis
            ax.set_yscale("symlog", linthresh=min(v for v in klds if v > 0))
            ax.set_ylim(0, max(klds) * 2)
    ax.margins(x=0.08, y=0.12)
    ax.set_ylabel("KLD vs reference (nats/token, lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    write_bytes_atomic(path, buf.getvalue())
    return path


def profile_charts(report: EvalReport, profile_name: str, out_dir: Path) -> list[Path]:
    """Write `<profile>-kld-vs-size.png` and `<profile>-kld-vs-speed.png`; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    profile = next(p for p in report.profiles if p.name == profile_name)
    fits = {v.variant: v.fits for v in report.verdicts if v.profile == profile_name}
    sel = report.selection_for(profile_name)
    chosen = sel.variant if sel else None
    size_pts: list[_Point] = []
    speed_pts: list[_Point] = []
    for v in report.variants:
        q = report.quality.get(v.name)
        if q is None:
            continue
        ok = fits.get(v.name, False)
        size_pts.append(_Point(v.name, v.weights_bytes / MIB, q.kld_mean, ok))
        tps = device_decode_tps(profile, report.perf_for(v.name, profile_name))
        if tps is not None:
            speed_pts.append(_Point(v.name, tps, q.kld_mean, ok))

    out: list[Path] = []
    specs = [
        ("size", size_pts, False, "weights size (MiB)", f"{profile_name}: quality vs size"),
        (
            "speed",
            speed_pts,
            True,
            f"decode tok/s, projected for {profile_name} (estimate)",
            f"{profile_name}: quality vs decode speed\nprojected for {profile_name} (estimate)",
        ),
    ]
    for key, pts, maximize, xlabel, title in specs:
        fig = Figure(figsize=(7.5, 4.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if pts:
            _draw(ax, pts, chosen, maximize_x=maximize, kld_budget=profile.budgets.max_kld)
            if maximize:
                ax.axvline(
                    profile.budgets.min_decode_tps,
                    color=STAR_COLOR,
                    ls=":",
                    lw=0.8,
                    alpha=0.6,
                    label=f"min decode {profile.budgets.min_decode_tps:g} tok/s",
                )
                ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no measured variants to plot", ha="center", va="center")
        missing = len(report.variants) - len(pts)
        if missing:
            xlabel += f"  ({missing} variant(s) without numbers not plotted)"
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        out.append(_save(fig, out_dir / f"{profile_name}-kld-vs-{key}.png"))
    return out


def all_charts(report: EvalReport, out_dir: Path) -> dict[str, list[Path]]:
    """Charts for every profile of the report, keyed by profile name (for the renderers)."""
    return {p.name: profile_charts(report, p.name, out_dir) for p in report.profiles}
