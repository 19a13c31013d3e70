"""The human report: report.md and report.html from the same document model.

Both are built from one list of blocks (headings, paragraphs, tables, images) so the Markdown and
the HTML can never say different things. The HTML is self-contained (inline CSS, no scripts or
CDNs; images by relative path) so it opens from a CI artifact or a file share. Every number says
how it was obtained: "host" for measured on this machine, "projected (estimate)" for host figures
scaled by a profile's relative speed.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from slmops.core.atomic import write_text_atomic
from slmops.core.units import fmt_bytes
from slmops.evaluate.schema import EvalReport, Stat
from slmops.evaluate.select import device_decode_tps, device_ttft_ms, fmt_num

NA = "—"


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)


@dataclass
class _Block:
    kind: str  # h1 | h2 | p | table | img
    text: str = ""
    table: _Table | None = None
    src: str = ""


def _f(x: float | None, spec: str = ".4g") -> str:
    return NA if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return NA if x is None else f"{x:.1%}"


def _usd(x: float | None) -> str:
    if x is None:
        return NA
    text = f"{x:,.2f}" if x >= 1 else f"{x:.3g}"
    return "$" + (text + "0" if re.fullmatch(r"\d+\.\d", text) else text)  # $0.60, not $0.6


def _stat(s: Stat | None, spec: str = ".1f") -> str:
    """median (min–max, n, spread), and "unstable" when the spread exceeds 10 %."""
    if s is None:
        return NA
    text = f"{s.median:{spec}} ({s.min:{spec}}–{s.max:{spec}}, n={s.n}"
    if s.n > 1:
        text += f", spread {s.spread:.0%}"
    return text + (") unstable" if s.unstable else ")")


def _header(report: EvalReport) -> list[_Block]:
    ref = report.reference
    name = ref.get("name") or ref.get("path") or "reference model"
    pr, h = report.protocol, report.host
    # A dequantized GGUF as reference is said first and plainly: KLD measures distance from it.
    note = [_Block("p", f"Note: {ref['note']}.")] if ref.get("note") else []
    return [
        _Block("h1", f"Evaluation report: {name}"),
        *note,
        _Block("p", "Reference: " + "; ".join(f"{k}: {v}" for k, v in ref.items() if k != "note")),
        _Block(
            "p",
            f"Created {report.created_at} by slmops {report.slmops_version}"
            + (f" in {report.wall_time_s:,.0f} s" if report.wall_time_s else "")
            + f". Host: {h.cpu}, {h.cores} cores, "
            f"{fmt_bytes(h.ram_bytes)} RAM, {h.platform}.",
        ),
        _Block(
            "p",
            f"Quality protocol: {pr.description.rstrip('.')}. Text: {pr.text_source} (sha256 {pr.text_digest[:12]}); "
            f"{pr.windows} windows of {pr.window_tokens} tokens, scored from position "
            f"{pr.scored_from} ({pr.tokens_scored:,} tokens scored), BOS {'on' if pr.bos else 'off'}. "
            "KLD is the mean KL(reference || variant) per scored token in nats; lower is better.",
        ),
        _Block(
            "p",
            "Performance labelled 'host' was measured on this host (median, min–max over repeats, "
            "the variants of a profile interleaved round by round); a figure whose spread "
            "(max − min) / median exceeds 10 % is marked unstable. Speed budgets are judged on "
            "the median and a miss within the figure's noise is not counted. "
            "Figures labelled 'projected (estimate)' are host figures scaled by the profile's "
            "relative speed; costs are estimates built on them.",
        ),
    ]


def _selection_table(report: EvalReport) -> list[_Block]:
    rows = []
    for p in report.profiles:
        sel = report.selection_for(p.name)
        cost = next((c for c in report.costs if c.profile == p.name), None)
        chosen = sel.variant if sel else None
        v = next((x for x in report.variants if x.name == chosen), None)
        q = report.quality.get(chosen) if chosen else None
        tps = device_decode_tps(p, report.perf_for(chosen, p.name)) if chosen else None
        rows.append(
            [
                p.name,
                chosen or "none fits",
                _f(q.kld_mean if q else None),
                fmt_bytes(v.weights_bytes) if v else NA,
                _f(tps, ".1f"),
                _usd(cost.device_usd_per_million_tokens if cost else None),
                _usd(cost.cloud_usd_per_million_tokens if cost else None),
                sel.reason if sel else "not selected",
            ]
        )
    headers = [
        "profile",
        "chosen variant",
        "KLD",
        "size",
        "decode tok/s, projected (estimate)",
        "device $ per 1M tokens (estimate)",
        "cloud $ per 1M tokens",
        "why",
    ]
    return [
        _Block("h2", "Selection per device profile"),
        _Block("table", table=_Table(headers, rows)),
    ]


def _profile_section(report: EvalReport, name: str, images: list[str]) -> list[_Block]:
    p = next(x for x in report.profiles if x.name == name)
    b = p.budgets
    sel = report.selection_for(name)
    cost = next((c for c in report.costs if c.profile == name), None)
    blocks = [
        _Block("h2", f"Profile {name}"),
        _Block(
            "p",
            f"{p.description or name} ({p.source}). Model RAM {fmt_bytes(p.ram_mb * 2**20)}, "
            f"storage {fmt_bytes(p.storage_mb * 2**20)}, {p.cores} cores, runtimes "
            f"{', '.join(p.runtimes)}, context {p.context_length}, prompt {p.prompt_tokens} tokens. "
            f"Budgets: TTFT ≤ {b.max_ttft_ms:g} ms, decode ≥ {b.min_decode_tps:g} tok/s, "
            f"KLD ≤ {b.max_kld:g}. Relative speed {p.relative_speed:g} × host (estimate). "
            f"Required by the gate: {'yes' if p.required else 'no'}.",
        ),
        _Block(
            "p",
            f"Chosen: {sel.variant}: {sel.reason}."
            if sel and sel.variant
            else f"No variant fits: {sel.reason if sel else 'no selection recorded'}.",
        ),
    ]
    if cost:
        blocks.append(_Block("p", f"Cost (estimate): {cost.assumptions}."))
    blocks += [_Block("img", text=f"{name} chart", src=src) for src in images]
    verdicts = {v.variant: v for v in report.verdicts if v.profile == name}
    rows, classes = [], []
    for v in report.variants:
        q, perf, verdict = (
            report.quality.get(v.name),
            report.perf_for(v.name, name),
            verdicts.get(v.name),
        )
        fits = verdict.fits if verdict else False
        label = v.name + (" (chosen)" if sel and sel.variant == v.name else "")
        ok = perf is not None and perf.status == "ok"
        rows.append(
            [
                label,
                v.runtime,
                "yes" if fits else "no",
                "; ".join(verdict.reasons + verdict.notes)
                if verdict and (verdict.reasons or verdict.notes)
                else ("" if fits else "not judged"),
                _f(q.kld_mean if q else None),
                _pct(q.top1_agreement if q else None),
                _f(q.perplexity if q else None),
                fmt_bytes(v.weights_bytes),
                _stat(perf.decode_tps if ok and perf else None),
                _f(device_decode_tps(p, perf), ".1f"),
                _stat(perf.ttft_ms if ok and perf else None, ".0f"),
                _f(device_ttft_ms(p, perf), ",.0f"),
                fmt_bytes(perf.peak_rss_bytes.max) if ok and perf and perf.peak_rss_bytes else NA,
                fmt_bytes(perf.memory_at_context_bytes)
                if perf and perf.memory_at_context_bytes
                else NA,
            ]
        )
        classes.append("chosen" if sel and sel.variant == v.name else ("fit" if fits else "miss"))
    headers = [
        "variant",
        "runtime",
        "fits",
        "broken budgets",
        "KLD",
        "top-1",
        "PPL",
        "size",
        "decode tok/s, host",
        "decode tok/s, projected (estimate)",
        "TTFT ms, host",
        "TTFT ms, projected (estimate)",
        "peak RSS, host (max)",
        f"memory at context {p.context_length}",
    ]
    blocks.append(_Block("table", table=_Table(headers, rows, classes)))
    return blocks


def _quality_table(report: EvalReport) -> list[_Block]:
    rows = []
    ref_ppl = None
    for v in report.variants:
        q = report.quality.get(v.name)
        if q is None:
            rows.append([v.name, *[NA] * 8])
            continue
        ref_ppl = q.reference_perplexity
        rows.append(
            [
                v.name,
                _f(q.kld_mean),
                f"{q.kld_ci95[0]:.4g}–{q.kld_ci95[1]:.4g}",
                _f(q.kld_p99),
                _pct(q.top1_agreement),
                f"{q.perplexity:.4g} (ref {q.reference_perplexity:.4g})",
                f"{_pct(q.greedy_agreement)} ({q.greedy_prompts} prompts)",
                f"{_pct(q.task_accuracy)} ({q.tasks} tasks)",
                fmt_num(q.eval_seconds),
            ]
        )
    headers = [
        "variant",
        "KLD mean",
        "KLD 95% CI",
        "KLD p99",
        "top-1 agreement",
        "PPL (reference)",
        "greedy agreement",
        "task accuracy",
        "eval s",
    ]
    note = "Quality does not depend on the device: one row per variant."
    if ref_ppl is not None:
        note += f" Reference perplexity under this protocol: {ref_ppl:.4g}."
    return [
        _Block("h2", "Quality per variant"),
        _Block("p", note),
        _Block("table", table=_Table(headers, rows)),
    ]


def _document(report: EvalReport, out_dir: Path, charts: dict[str, list[Path]]) -> list[_Block]:
    blocks = _header(report) + _selection_table(report)
    for p in report.profiles:
        rel = [Path(os.path.relpath(c, out_dir)).as_posix() for c in charts.get(p.name, [])]
        blocks += _profile_section(report, p.name, rel)
    return blocks + _quality_table(report)


def _md_escape(text: str, *, cell: bool = False) -> str:
    """Keep Markdown readable: neutralise what starts HTML (`<`, entities); in cells, pipes too."""
    t = re.sub(r"&(?=#?\w+;)", "&amp;", text).replace("<", "&lt;").replace("\n", " ")
    return t.replace("\\", "\\\\").replace("|", "\\|") if cell else t


def _to_markdown(blocks: list[_Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(("#" if b.kind == "h1" else "##") + " " + _md_escape(b.text))
        elif b.kind == "p":
            out.append(_md_escape(b.text))
        elif b.kind == "img":
            out.append(f"![{_md_escape(b.text, cell=True)}]({quote(b.src)})")
        elif b.table is not None:
            t = b.table
            lines = ["| " + " | ".join(_md_escape(h, cell=True) for h in t.headers) + " |"]
            lines.append("|" + "---|" * len(t.headers))
            lines += [
                "| " + " | ".join(_md_escape(c, cell=True) for c in row) + " |" for row in t.rows
            ]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.miss td{color:#777}tr.chosen td{background:#fff6d5;font-weight:600}
img{max-width:48%;margin:.5em 1% .5em 0;border:1px solid #eee}
"""


def _to_html(blocks: list[_Block], title: str) -> str:
    e = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "p"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "img":
            out.append(f'<img src="{e(quote(b.src))}" alt="{e(b.text)}">')
        elif b.table is not None:
            t = b.table
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers))
            out.append("</tr></thead><tbody>")
            for i, row in enumerate(t.rows):
                cls = f' class="{e(t.row_classes[i])}"' if i < len(t.row_classes) else ""
                out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_markdown(report: EvalReport, out_dir: Path, charts: dict[str, list[Path]]) -> Path:
    """Write out_dir/report.md; `charts` maps profile name to its PNGs (linked relatively)."""
    path = out_dir / "report.md"
    write_text_atomic(path, _to_markdown(_document(report, out_dir, charts)))
    return path


def write_html(report: EvalReport, out_dir: Path, charts: dict[str, list[Path]]) -> Path:
    """Write out_dir/report.html: self-contained, every text escaped, images by relative path."""
    path = out_dir / "report.html"
    blocks = _document(report, out_dir, charts)
    write_text_atomic(path, _to_html(blocks, blocks[0].text))
    return path


def render_report(report: EvalReport, out_dir: Path) -> list[Path]:
    """Charts (under out_dir/charts) plus report.md and report.html; returns every file written."""
    from slmops.evaluate.charts import all_charts

    charts = all_charts(report, out_dir / "charts")
    md = write_markdown(report, out_dir, charts)
    page = write_html(report, out_dir, charts)
    return [*(c for paths in charts.values() for c in paths), md, page]
