"""The Pareto frontier and the fit of energy against accuracy along it: known frontiers, planted forms and
parameters recovered within their intervals, and a verdict that does not overclaim."""

from __future__ import annotations

import json

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope.analysis import (  # noqa: E402
    PLANTED,
    AnalysisWarning,
    ResultsError,
    fit_frontier,
    load_results,
    pareto_frontier,
    select_slice,
    synthetic_database,
)


def frame(top1, energy_j, **extra) -> pd.DataFrame:
    return pd.DataFrame({"top1": top1, "energy_per_image_j": energy_j, **extra})


def test_pareto_frontier_of_a_hand_built_set():
    df = frame(
        top1=[70.0, 75.0, 72.0, 80.0, 80.0, 79.0, 85.0, 60.0, np.nan, 85.0],
        energy_j=[0.10, 0.20, 0.30, 0.50, 0.40, 0.45, 1.00, 0.12, 0.01, 1.00],
        name=list("abcdefghij"),
    )
    front = pareto_frontier(df)
    # c is beaten by b (more accurate, cheaper); d by e (same accuracy, cheaper); f by e; h by a; i has no
    # accuracy; j ties g exactly and the first of the two stays.
    assert list(front["name"]) == ["a", "b", "e", "g"]
    assert list(front.index) == [0, 1, 4, 6]
    assert front["energy_per_image_j"].is_monotonic_increasing and front["top1"].is_monotonic_increasing


def test_pareto_frontier_with_other_columns_and_empty_input():
    df = frame(top1=[1.0, 2.0], energy_j=[5.0, 1.0], acc=[0.9, 0.8])
    assert list(pareto_frontier(df, energy="top1", accuracy="acc").index) == [0]
    assert pareto_frontier(df.iloc[:0]).empty


@pytest.fixture(scope="module")
def synthetic_slice(tmp_path_factory):
    path = synthetic_database(tmp_path_factory.mktemp("fit") / "s.sqlite", n_models=40, seed=0)
    return select_slice(load_results(path))


def test_planted_double_exponential_is_recovered_within_its_intervals(synthetic_slice):
    fit = fit_frontier(synthetic_slice)
    assert fit.best == "double_exponential"
    assert fit.verdict.startswith("The data strongly supports the double exponential")
    row = fit.forms.set_index("form").loc["double_exponential"]
    for name, planted in (("e0_j", PLANTED.e0_j), ("alpha", PLANTED.alpha), ("beta_per_pt", PLANTED.beta_per_pt)):
        low, high = row["params_ci95"][name]
        assert low < planted < high, (name, low, planted, high)
        assert low < row["params"][name] < high
        assert high - low < 0.5 * abs(planted)  # informative, not merely wide
    others = fit.forms.set_index("form").drop(index="double_exponential")
    assert (others["delta_aicc"] > 10).all() and row["delta_aicc"] == 0.0
    assert row["r2"] > 0.98 and (others["r2"] < row["r2"]).all()
    top1 = np.array([65.0, 75.0, 85.0])
    np.testing.assert_allclose(fit.predict_energy_j(top1), PLANTED.frontier_energy_j(top1), rtol=0.05)


def curve_frame(log_energy, n=20, noise=0.03, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = np.linspace(60.0, 88.0, n)
    return frame(a, np.exp(log_energy(a) + rng.normal(0.0, noise, n)))


def test_planted_exponential_and_power_law_are_told_apart():
    # A nested form: the double exponential contains the exponential as its limit, so it can only lose by its
    # extra parameter (and, with one seed in ~40, wins by chance; this seed is not that one).
    exp_fit = fit_frontier(curve_frame(lambda a: np.log(0.1) + 0.15 * (a - 80), seed=1))
    assert exp_fit.best == "exponential"
    assert "supports the double exponential" not in exp_fit.verdict
    row = exp_fit.forms.set_index("form").loc["exponential"]
    low, high = row["params_ci95"]["beta_per_pt"]
    assert low < 0.15 < high
    low, high = row["params_ci95"]["e80_j"]
    assert low < 0.1 < high

    pow_fit = fit_frontier(curve_frame(lambda a: np.log(0.1) - 3.0 * np.log((100 - a) / 20), seed=1))
    assert pow_fit.best == "power_law"
    assert "power law" in pow_fit.verdict.split(":")[0]
    low, high = pow_fit.forms.set_index("form").loc["power_law", "params_ci95"]["k"]
    assert low < 3.0 < high


def test_few_frontier_points_cannot_decide(synthetic_slice):
    # Six frontier points from a strongly curved planted frontier: AICc may rank, but the verdict must not decide.
    a = np.array([62.0, 68.0, 73.0, 78.0, 83.0, 87.0])
    df = frame(a, PLANTED.frontier_energy_j(a) * np.exp([0.01, -0.02, 0.015, -0.01, 0.02, -0.015]))
    fit = fit_frontier(df)
    assert fit.verdict.startswith("The data cannot decide") and "6 frontier points" in fit.verdict
    assert len(fit.frontier) == 6


def test_too_few_points_or_no_spread_are_results_errors():
    with pytest.raises(ResultsError, match="frontier has 2 models; a fit needs at least 3"):
        fit_frontier(frame([70.0, 80.0, 60.0], [0.1, 0.2, 0.3]))
    with pytest.raises(ResultsError, match="needs at least 3"):
        fit_frontier(frame([np.nan] * 4, [0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ResultsError, match="frontier has 1 model;"):  # equal accuracies: only the cheapest
        fit_frontier(frame([80.0, 80.0, 80.0], [0.1, 0.2, 0.3]))
    with pytest.warns(AnalysisWarning, match=r"frontier fit: 1 result left out.*row 0\): energy_per_image_j 0\b"):
        fit = fit_frontier(frame([70.0, 75.0, 80.0, 85.0], [0.0, 0.1, 0.2, 0.4]))  # no ln of a zero energy
    assert len(fit.frontier) == 3


def test_curve_clamps_and_to_dict_is_strict_json(synthetic_slice):
    fit = fit_frontier(synthetic_slice)
    low, high = fit.top1_range_pct
    curve = fit.curve(50)
    assert len(curve) == 50 and curve["top1"].iloc[0] == low and curve["top1"].iloc[-1] == high
    assert curve["energy_per_image_j"].is_monotonic_increasing
    assert fit.predict_energy_j(low - 10) == pytest.approx(fit.predict_energy_j(low))
    for form in ("exponential", "power_law"):
        assert len(fit.curve(5, form)) == 5
    payload = json.loads(json.dumps(fit.to_dict(), allow_nan=False))
    assert payload["best"] == "double_exponential" and len(payload["forms"]) == 3
    assert {"aic", "aicc", "bic", "r2", "rmse_log", "n", "params", "params_ci95"} <= set(payload["forms"][0])
    assert len(payload["frontier"]) == len(fit.frontier)


def test_an_open_interval_when_curvature_is_not_resolved():
    # A straight line in ln E: the double exponential's curvature interval must reach 0 (its exponential limit).
    fit = fit_frontier(curve_frame(lambda a: np.log(0.1) + 0.15 * (a - 80), n=10, noise=0.05, seed=4))
    row = fit.forms.set_index("form").loc["double_exponential"]
    assert row["params_ci95"]["beta_per_pt"][0] == 0.0
    assert row["note"]
    json.dumps(fit.to_dict(), allow_nan=False)
