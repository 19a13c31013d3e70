"""One way to print a byte count, so a bundle has one size everywhere.

Binary units, labelled as such (KiB, MiB, GiB): device profiles give RAM and storage in MiB
(``ram_mb``/``storage_mb``), charts plot MiB, and the CLI, the evaluation report and the
dashboard used to print the same file as decimal MB, binary "MB" and KiB.
"""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def fmt_bytes(n: float | None) -> str:
    """``812 MiB``, ``3.4 MiB``, ``1.2 GiB``, ``512 B``; ``n/a`` for None.

    Three significant figures at most: one decimal below 10 of a unit, none above.
    """
    if n is None:
        return "n/a"
    value = float(n)
    if abs(value) < KIB:
        return f"{int(value)} B"
    for unit, scale in (("KiB", KIB), ("MiB", MIB), ("GiB", GIB)):
        scaled = value / scale
        if abs(scaled) < 1024 or unit == "GiB":
            return f"{scaled:.1f} {unit}" if abs(scaled) < 10 else f"{scaled:.0f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
