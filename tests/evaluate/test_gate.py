"""Gate semantics: required profiles must have a variant; quality must not regress past a threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factories.reports import VARIANTS, make_report
from slmops.core.errors import ConfigError
from slmops.evaluate.gate import gate, load_report


def test_required_profile_without_fitting_variant_fails() -> None:
    result = gate(make_report())
    assert not result.ok
    assert len(result.reasons) == 1
    assert result.reasons[0].startswith(
        "required profile gw has no fitting variant (no variant fits gw"
    )
    by_name = {c["name"]: c for c in result.checks}
    assert by_name["selection:pi"]["ok"] and not by_name["selection:gw"]["ok"]
    assert json.loads(json.dumps(result.to_dict()))["ok"] is False


def test_required_list_overrides_profile_flags() -> None:
    assert gate(make_report(), required=["pi"]).ok
    missing = gate(make_report(), required=["pi", "jetson"])
    assert not missing.ok and "required profile jetson is not in the report" in missing.reasons[0]


def test_optional_profile_without_variant_passes() -> None:
    r = make_report()
    r.profiles[1].required = False
    assert gate(r).ok


def _regressed(kld_q8: float) -> dict[str, tuple[str, int, float, float, float, int]]:
    specs = dict(VARIANTS)
    specs.pop("f16")  # the new build has no f16 and a worse q8: pi selects q8 with this KLD
    q8 = specs["q8"]
    specs["q8"] = (q8[0], q8[1], kld_q8, q8[3], q8[4], q8[5])
    return specs


def test_kld_regression_beyond_threshold_fails() -> None:
    baseline = make_report()
    current = make_report(_regressed(0.02))
    result = gate(current, baseline=baseline, required=["pi"])
    assert not result.ok
    assert result.reasons == [
        "pi: KLD of the selected variant increased from 0.0015 (q8, baseline) to 0.02 (q8), "
        "+0.0185; more than the allowed increase of 0.01"
    ]


def test_kld_change_within_threshold_passes() -> None:
    result = gate(make_report(_regressed(0.01)), baseline=make_report(), required=["pi"])
    assert result.ok, result.reasons
    assert any(c["name"] == "regression:pi" and "within" in c["detail"] for c in result.checks)
    assert not gate(
        make_report(_regressed(0.01)),
        baseline=make_report(),
        required=["pi"],
        max_kld_increase=0.005,
    ).ok


def test_profile_losing_its_selection_fails() -> None:
    baseline = make_report()
    current = make_report()
    sel = current.selection_for("pi")
    assert sel is not None
    sel.variant = None
    result = gate(current, baseline=baseline, required=[])
    assert result.reasons == ["pi had q8 selected in the baseline but now has no fitting variant"]


def test_load_report_roundtrip_and_errors(tmp_path: Path) -> None:
    report = make_report()
    (tmp_path / "report.json").write_text(report.model_dump_json(by_alias=True))
    assert load_report(tmp_path).selection_for("pi") == report.selection_for("pi")
    assert load_report(tmp_path / "report.json").variants == report.variants

    with pytest.raises(ConfigError) as exc:
        load_report(tmp_path / "nowhere")
    assert exc.value.exit_code == 2 and "slmops evaluate" in (exc.value.hint or "")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no report\.json in this directory"):
        load_report(empty)
    (empty / "report.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the evaluation report"):
        load_report(empty)
    (empty / "report.json").write_text(json.dumps({"schema": "other/v9"}))
    with pytest.raises(ConfigError, match="found 'other/v9'"):
        load_report(empty)
    (empty / "report.json").write_text(
        json.dumps({"schema": "slmops.eval-report/v1", "variants": 3})
    )
    with pytest.raises(ConfigError) as bad:
        load_report(empty)
    assert str(empty / "report.json") in str(bad.value)
