"""`wattscope compare`: the t distribution without scipy, Welch's test, the gate's exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from wattscope import cli
from wattscope.compare import (
    compare_files,
    compare_regions,
    regularized_incomplete_beta,
    student_t_two_sided_p,
    welch_t_test,
)
from wattscope.embed.results_file import FORMAT, write_results


@pytest.mark.parametrize("x", [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_incomplete_beta_closed_forms(x: float) -> None:
    assert regularized_incomplete_beta(1, 1, x) == pytest.approx(x, abs=1e-14)
    assert regularized_incomplete_beta(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-14)
    assert regularized_incomplete_beta(1, 2.25, x) == pytest.approx(1 - (1 - x) ** 2.25, abs=1e-14)
    # I_x(a, b) + I_{1-x}(b, a) = 1
    assert regularized_incomplete_beta(2.5, 7, x) + regularized_incomplete_beta(7, 2.5, 1 - x) == pytest.approx(1)


def test_incomplete_beta_symmetric_midpoint_and_bad_arguments() -> None:
    for a in (0.5, 3, 40, 2500):
        assert regularized_incomplete_beta(a, a, 0.5) == pytest.approx(0.5, abs=1e-10)
    with pytest.raises(ValueError, match="a > 0"):
        regularized_incomplete_beta(0, 1, 0.5)
    with pytest.raises(ValueError, match="0 <= x <= 1"):
        regularized_incomplete_beta(1, 1, 1.5)


@pytest.mark.parametrize("t", [0.0, 0.1, 1.0, 3.0, 12.0, -2.0])
def test_t_tail_closed_forms(t: float) -> None:
    # df = 1 is the Cauchy distribution; df = 2 has a closed form too.
    assert student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-12, abs=1e-15)
    assert student_t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("t", "df", "p"), [
    (2.228138852, 10, 0.05),   # tabulated two-sided 5 % critical values
    (12.70620474, 1, 0.05),
    (2.749995652, 30, 0.01),
    (1.959963985, 1e7, 0.05),  # the normal limit
    (4.302652730, 2, 0.05),
])
def test_t_tail_tabulated(t: float, df: float, p: float) -> None:
    assert student_t_two_sided_p(t, df) == pytest.approx(p, rel=1e-6)


def test_t_tail_against_scipy_for_fractional_df() -> None:
    stats = pytest.importorskip("scipy.stats")
    for t in (1e-6, 0.4, 1.7, 5.0, 30.0):
        for df in (0.7, 2.3, 4.41, 17.9, 250.5):
            assert student_t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-300)


def test_welch_by_hand() -> None:
    # means 2.5 and 5, variances 5/3 and 20/3, n = 4 each: t = 2.5 / sqrt(25/12), df = 4.4118 (Satterthwaite).
    r = welch_t_test([1, 2, 3, 4], [2, 4, 6, 8])
    assert r.t == pytest.approx(math.sqrt(3))
    assert r.df == pytest.approx(75 / 17)
    assert r.p_value == pytest.approx(0.151580504845, rel=1e-9)
    assert welch_t_test([2, 4, 6, 8], [1, 2, 3, 4]).t == pytest.approx(-math.sqrt(3))
    same = welch_t_test([5, 5, 5], [5, 5])
    assert same.p_value == 1.0 and same.t == 0.0
    moved = welch_t_test([5, 5, 5], [6, 6])
    assert moved.p_value == 0.0 and moved.t == math.inf
    with pytest.raises(ValueError, match="at least 2"):
        welch_t_test([1.0], [1.0, 2.0])


def _trials(values: list[float], uncertainty_j: float = 0.1) -> list[dict]:
    return [{"energy_j": v, "uncertainty_j": uncertainty_j, "duration_s": 1.0} for v in values]


def _write(tmp_path: Path, name: str, regions: dict[str, list[dict]]) -> Path:
    return write_results(tmp_path / name, regions, tool="test")


def test_gate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _write(tmp_path, "old.json", {
        "steady": _trials([100.0, 101.0, 99.0, 100.5]),
        "worse": _trials([50.0, 50.5, 49.5, 50.2]),
        "noisy": _trials([40.0, 60.0, 45.0, 55.0]),
        "gone": _trials([1.0, 1.0]),
    })
    new = _write(tmp_path, "new.json", {
        "steady": _trials([100.2, 100.8, 99.4, 100.1]),
        "worse": _trials([56.0, 56.4, 55.7, 56.1]),     # +12 %, clearly significant
        "noisy": _trials([48.0, 70.0, 50.0, 62.0]),     # +12 % too, but not significant at 5 %
        "new": _trials([3.0, 3.0]),
    })
    changes = {c.region: c for c in compare_files(old, new)}
    assert changes["worse"].regression and changes["worse"].method == "welch"
    assert changes["worse"].change == pytest.approx(56.05 / 50.05 - 1)
    assert changes["noisy"].change > 0.05 and not changes["noisy"].regression
    assert changes["noisy"].p_value > 0.05
    assert not changes["steady"].regression
    assert changes["gone"].method == "none" and changes["new"].old_n == 0

    assert cli.main(["compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "worse" in out and "only in new" in out
    # Past a 15 % threshold nothing regresses; the reverse direction is an improvement, not a failure.
    assert cli.main(["compare", str(old), str(new), "--threshold", "0.15"]) == 0
    assert cli.main(["compare", str(new), str(old)]) == 0
    assert "improved" in capsys.readouterr().out
    # A stricter alpha keeps "worse" significant; metric selection reads another key.
    assert cli.main(["compare", str(old), str(new), "--alpha", "0.001"]) == 1
    assert cli.main(["compare", str(old), str(new), "--metric", "duration_s"]) == 0


def test_single_trials_fall_back_to_the_stated_uncertainty(tmp_path: Path) -> None:
    # Measurement.to_json() documents: one trial each, compared against their uncertainties.
    old = tmp_path / "old.json"
    new = tmp_path / "new.json"
    old.write_text(json.dumps({"name": "step", "energy_j": 10.0, "uncertainty_j": 0.2}))
    new.write_text(json.dumps({"name": "step", "energy_j": 11.0, "uncertainty_j": 0.2}))
    (c,) = compare_files(old, new)
    assert c.method == "uncertainty"
    assert c.p_value == pytest.approx(math.erfc(1.0 / math.hypot(0.2, 0.2) / math.sqrt(2)))
    assert c.regression
    new.write_text(json.dumps({"name": "step", "energy_j": 10.6, "uncertainty_j": 0.4}))
    (c,) = compare_files(old, new)
    assert c.change == pytest.approx(0.06) and not c.regression  # 1.3 sigma: not significant


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path, "good.json", {"a": _trials([1.0, 2.0])})
    other = _write(tmp_path, "other.json", {"b": _trials([1.0, 2.0])})
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text(json.dumps({"format": "something/9", "regions": {}}))
    (tmp_path / "shape.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "nan.json").write_text(json.dumps({"format": FORMAT, "regions": {"a": [{"energy_j": None}]}}))
    for bad in ("missing.json", "bad.json", "wrong.json", "shape.json", "nan.json"):
        assert cli.main(["compare", str(good), str(tmp_path / bad)]) == 2, bad
    err = capsys.readouterr().err
    assert "is not JSON" in err and "unknown results format" in err and "no trial in the new file has a finite" in err
    assert cli.main(["compare", str(good), str(good), "--alpha", "1.5"]) == 2
    assert cli.main(["compare", str(good), str(other)]) == 2
    assert "no region in common" in capsys.readouterr().err


def test_non_finite_trials_are_skipped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # RAPL unreadable in one trial (cpu.energy_j written as null), and a region on one side only with no CPU value.
    def trial(gpu_j: float, cpu_j: float | None) -> dict:
        return {"energy_j": gpu_j, "uncertainty_j": 0.1, "cpu.energy_j": cpu_j}

    old = _write(tmp_path, "old.json", {"step": [trial(10, 5.0), trial(10.1, 5.1), trial(9.9, None)],
                                        "gone": [trial(1, None)]})
    new = _write(tmp_path, "new.json", {"step": [trial(10, 5.0), trial(10.1, 5.05), trial(10.0, 4.95)]})
    changes = {c.region: c for c in compare_files(old, new, metric="cpu.energy_j")}
    assert changes["step"].old_n == 2 and changes["step"].method == "welch"
    assert changes["step"].notes == ("old: trial 2 skipped: 'cpu.energy_j' is None, not a finite number",)
    assert changes["gone"].old_n == 0 and changes["gone"].verdict == "only in old"
    assert cli.main(["compare", str(old), str(new), "--metric", "cpu.energy_j"]) == 0
    assert "note: step: old: trial 2 skipped" in capsys.readouterr().out
    # A compared region with no finite value left on a side is an error.
    none_left = _write(tmp_path, "none.json", {"step": [trial(10, None), trial(10, None)]})
    with pytest.raises(ValueError, match="region 'step': no trial in the new file has a finite 'cpu.energy_j'"):
        compare_files(old, none_left, metric="cpu.energy_j")


def test_misspelt_metric_lists_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path, "a.json", {"a": _trials([1.0, 2.0])})
    assert cli.main(["compare", str(f), str(f), "--metric", "energy"]) == 2
    err = capsys.readouterr().err
    assert "no trial has the key 'energy'" in err and "duration_s, energy_j, uncertainty_j" in err


def test_one_trial_a_side_without_uncertainty_is_untested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _write(tmp_path, "old.json", {"a": [{"energy_j": 1.0, "duration_s": 1.0}]})
    new = _write(tmp_path, "new.json", {"a": [{"energy_j": 1.0, "duration_s": 1.5}]})  # +50 %, nothing to test it by
    (c,) = compare_files(old, new, metric="duration_s")
    assert c.method == "none" and c.p_value is None and c.verdict == "untested" and not c.regression
    assert cli.main(["compare", str(old), str(new), "--metric", "duration_s"]) == 2
    captured = capsys.readouterr()
    assert "no region could be tested" in captured.err and "untested" in captured.out


def test_the_gate_is_one_sided() -> None:
    # t = 2.2 with df = 4: two-sided p = 0.093, not significant at 5 %, but the rise has one-sided p = 0.046.
    old = {"r": [{"energy_j": v} for v in (10.0, 10.0, 10.0, 10.0, 10.0)]}
    t_target = 2.2
    # new = 10 + d + e_i with sample sd s: t = d / (s / sqrt(5)); e = (-2,-1,0,1,2) * k has sd k * sqrt(2.5).
    k = 0.1
    d = t_target * k * math.sqrt(2.5) / math.sqrt(5)
    new = {"r": [{"energy_j": 10.0 + d + e * k} for e in (-2, -1, 0, 1, 2)]}
    (c,) = compare_regions(old, new, threshold=0.0, alpha=0.05)
    assert c.p_value == pytest.approx(student_t_two_sided_p(2.2, 4))
    assert c.p_value > 0.05 and c.p_increase == pytest.approx(c.p_value / 2) and c.regression
    (back,) = compare_regions(new, old, threshold=0.0, alpha=0.05)
    assert back.p_increase == pytest.approx(1 - c.p_value / 2) and back.improvement and not back.regression
