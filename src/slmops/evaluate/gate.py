"""The CI gate over an evaluation report: can we ship, and did quality regress?

A pipeline fails a build (exit 1, `CheckFailedError`) when a required device class has no variant
that fits its budgets, or, given the previous release's report as a baseline, when the variant a
device would now receive is worse than the one it received before by more than a threshold of
KL divergence, or when a device that had a variant before now has none. Every failed check is a
sentence naming the profile, the variants and the numbers, because the reader is someone looking
at a red CI job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.core.errors import ConfigError
from slmops.evaluate.schema import REPORT_SCHEMA, EvalReport

REPORT_FILE = "report.json"
_HINT = "run `slmops evaluate VARIANTS_DIR --profiles ... --out REPORT_DIR` to write one"


@dataclass
class GateResult:
    """Outcome of the gate: ok, the failure sentences, and every check run (passed or not)."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_report(path: Path) -> EvalReport:
    """Read REPORT_DIR/report.json (or a report.json path); bad input is a ConfigError (exit 2)."""
    p = path / REPORT_FILE if path.is_dir() else path
    if not p.exists():
        what = (
            "no report.json in this directory" if path.is_dir() else "evaluation report not found"
        )
        raise ConfigError(what, where=p, hint=_HINT)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read the evaluation report: {exc}", where=p, hint=_HINT
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("not an evaluation report (expected a JSON object)", where=p, hint=_HINT)
    schema = data.get("schema")
    if schema != REPORT_SCHEMA:
        raise ConfigError(
            f"not an evaluation report of schema {REPORT_SCHEMA} (found {schema!r})",
            where=p,
            hint=f"re-run `slmops evaluate` with this version; {_HINT}",
        )
    return EvalReport.from_data(data, source=str(p))


def _kld(report: EvalReport, variant: str) -> float | None:
    q = report.quality.get(variant)
    return q.kld_mean if q else None


def gate(
    report: EvalReport,
    *,
    baseline: EvalReport | None = None,
    max_kld_increase: float = 0.01,
    required: list[str] | None = None,
) -> GateResult:
    """Run the checks. `required` (when given) replaces the profiles' own `required` flags."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail})

    names = [p.name for p in report.profiles]
    must = (
        set(required) if required is not None else {p.name for p in report.profiles if p.required}
    )
    for name in sorted(must - set(names)):
        check(
            f"selection:{name}",
            False,
            f"required profile {name} is not in the report ({', '.join(names)})",
        )
    for name in names:
        sel = report.selection_for(name)
        chosen = sel.variant if sel else None
        if chosen:
            check(f"selection:{name}", True, f"{name}: selected {chosen}")
        elif name in must:
            why = sel.reason if sel else "no selection recorded"
            check(
                f"selection:{name}",
                False,
                f"required profile {name} has no fitting variant ({why})",
            )
        else:
            check(
                f"selection:{name}", True, f"{name} has no fitting variant, but it is not required"
            )

    if baseline is not None:
        if baseline.protocol.text_digest != report.protocol.text_digest:
            check(
                "baseline:protocol",
                True,
                "note: the baseline was scored on other text "
                f"({baseline.protocol.text_digest[:12]} vs {report.protocol.text_digest[:12]}); "
                "KLD comparisons are approximate",
            )
        for name in names:
            old_sel = baseline.selection_for(name)
            old = old_sel.variant if old_sel else None
            if old is None:
                continue
            sel = report.selection_for(name)
            new = sel.variant if sel else None
            if new is None:
                check(
                    f"regression:{name}",
                    False,
                    f"{name} had {old} selected in the baseline but now has no fitting variant",
                )
                continue
            old_kld, new_kld = _kld(baseline, old), _kld(report, new)
            if old_kld is None or new_kld is None:
                check(
                    f"regression:{name}",
                    False,
                    f"{name}: no KLD recorded for {old if old_kld is None else new}",
                )
                continue
            delta = new_kld - old_kld
            ok = delta <= max_kld_increase
            verb = "increased" if delta > 0 else "changed"
            detail = (
                f"{name}: KLD of the selected variant {verb} from {old_kld:.4g} ({old}, baseline) "
                f"to {new_kld:.4g} ({new}), {delta:+.4g}; "
                f"{'within' if ok else 'more than'} the allowed increase of {max_kld_increase:g}"
            )
            check(f"regression:{name}", ok, detail)

    reasons = [c["detail"] for c in checks if not c["ok"]]
    return GateResult(ok=not reasons, reasons=reasons, checks=checks)
