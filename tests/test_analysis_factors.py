"""Factors behind energy: planted elasticities recovered by the one-at-a-time and joint log-log regressions."""

from __future__ import annotations

import math

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope.analysis import factors  # noqa: E402


def planted(n=80, seed=0, noise=0.05) -> pd.DataFrame:
    """E = 0.002 J x GMACs^0.5 x activations^0.4 x family factor, with GMACs and activations independent."""
    rng = np.random.default_rng(seed)
    gmacs = np.exp(rng.uniform(np.log(0.3), np.log(40), n))
    acts = np.exp(rng.uniform(np.log(2), np.log(80), n))
    family = np.where(np.arange(n) % 2 == 0, "convy", "attny")
    factor = np.where(family == "convy", 1.0, 2.0)
    energy = 0.002 * gmacs**0.5 * acts**0.4 * factor * np.exp(rng.normal(0, noise, n))
    return pd.DataFrame(
        {
            "energy_per_image_j": energy,
            "gmacs": gmacs,
            "activations_m": acts,
            "params_m": np.exp(rng.uniform(1, 4, n)),
            "img_size": rng.choice([224, 256, 288], n),
            "family": family,
        }
    )


def test_joint_regression_recovers_planted_elasticities():
    report = factors(planted())
    multiple = report.multiple.set_index("factor")
    for name, slope in (("gmacs", 0.5), ("activations", 0.4), ("params", 0.0), ("img_size", 0.0)):
        low, high = multiple.loc[name, "slope_ci95"]
        assert low < slope < high, name
    assert multiple.loc["gmacs", "partial_r2"] > 0.5 and multiple.loc["params", "partial_r2"] < 0.1
    assert report.multiple_n == 80 and 0.5 < report.multiple_r2 < 1.0


def test_one_factor_regressions_and_family():
    df = planted()
    reg = factors(df).regressions.set_index("factor")
    assert list(reg.index) == ["gmacs", "activations", "params", "img_size", "family"]
    low, high = reg.loc["gmacs", "slope_ci95"]
    assert low < 0.5 < high and reg.loc["gmacs", "n"] == 80
    # ln E against ln GMACs alone, by hand.
    x, y = np.log(df["gmacs"]), np.log(df["energy_per_image_j"])
    slope = np.polyfit(x, y, 1)[0]
    assert reg.loc["gmacs", "slope"] == pytest.approx(slope)
    assert math.isnan(reg.loc["family", "slope"]) and 0.0 < reg.loc["family", "r2"] < 1.0


def test_family_r2_is_undefined_with_one_model_per_family():
    df = planted(n=6).assign(family=list("abcdef"))
    assert math.isnan(factors(df).regressions.set_index("factor").loc["family", "r2"])


def test_energy_per_gmac_by_family():
    df = pd.DataFrame(
        {
            "energy_per_image_j": [0.1, 0.4, 1.0, 2.0],
            "gmacs": [10.0, 10.0, 10.0, 10.0],
            "activations_m": 1.0,
            "params_m": 1.0,
            "img_size": 224,
            "family": ["a", "a", "b", "b"],
        }
    )
    per = factors(df).energy_per_gmac_by_family.set_index("family")
    assert per.loc["a", "energy_per_gmac_j"] == pytest.approx(math.sqrt(0.01 * 0.04))
    assert per.loc["b", "n_models"] == 2 and per.loc["b", "ci95_low"] < 0.1414 < per.loc["b", "ci95_high"]
    assert list(per.index) == ["a", "b"]  # cheapest per GMAC first


def test_missing_compute_figures_are_left_out():
    df = planted(n=20)
    df.loc[:4, "gmacs"] = np.nan
    report = factors(df)
    assert report.regressions.set_index("factor").loc["gmacs", "n"] == 15
    assert report.multiple_n == 15
