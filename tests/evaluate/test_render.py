"""Charts are real PNGs; report.md/report.html say what was chosen, why others were rejected, and escape text."""

from __future__ import annotations

import re
from pathlib import Path

from factories.reports import VARIANTS, make_report
from slmops.evaluate.charts import profile_charts
from slmops.evaluate.render import render_report, write_html, write_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_charts_are_valid_pngs(tmp_path: Path) -> None:
    report = make_report()
    for profile in ("pi", "gw"):
        paths = profile_charts(report, profile, tmp_path / "charts")
        assert [p.name for p in paths] == [
            f"{profile}-kld-vs-size.png",
            f"{profile}-kld-vs-speed.png",
        ]
        for p in paths:
            data = p.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not [p for p in (tmp_path / "charts").iterdir() if p.name.startswith(".slmops-tmp-")]


def test_markdown_and_html_contain_choice_reasons_and_images(tmp_path: Path) -> None:
    report = make_report()
    files = render_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert {tmp_path / "report.md", tmp_path / "report.html"} <= set(files)
    for text in (md, page):
        assert "tiny-llama" in text and "8 windows of 256 tokens" in text
        assert "q8 (chosen)" in text
        assert (
            "runtime: onnxruntime-genai (onnx-genai) not available on this device (has: gguf)"
            in text
        )
        assert (
            "runtime: onnxruntime-genai (onnx-genai) not available on this device (has: gguf)"
            in text
        )
        assert "no variant fits gw" in text
        assert "projected (estimate)" in text and "host" in text
        assert "$0.167" in text and "$0.60" in text  # device vs cloud per million tokens
    assert "memory at context 1024: 950 MiB > 700 MiB" in md
    assert "memory at context 1024: 950 MiB &gt; 700 MiB" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    md_srcs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(srcs) == 4 and srcs == md_srcs
    assert all((tmp_path / s).is_file() for s in srcs)
    assert "<script" not in page and "http" not in page


def test_html_escapes_variant_names(tmp_path: Path) -> None:
    specs = dict(VARIANTS)
    specs["q<b>4|x"] = specs.pop("q4")
    report = make_report(specs)
    charts = {p.name: profile_charts(report, p.name, tmp_path / "c") for p in report.profiles}
    page = write_html(report, tmp_path, charts).read_text()
    md = write_markdown(report, tmp_path, charts).read_text()
    assert "q&lt;b&gt;4|x" in page and "<b>4" not in page
    assert "q&lt;b>4\\|x" in md and "<b>" not in md
