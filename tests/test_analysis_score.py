"""The energy-efficiency score: fixed log-spaced bands, models placed by hand at known ratios, and the measurement
interval carried into the band."""

from __future__ import annotations

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("scipy")

from wattscope.analysis import (  # noqa: E402
    BAND_COLOURS,
    BAND_EDGES,
    BANDS,
    SCORE_VERSION,
    band_of,
    fit_frontier,
    score_formula,
    score_models,
)
from wattscope.analysis.score import band_edges_text  # noqa: E402


def test_band_edges_are_fixed_log_spaced_and_inclusive():
    assert BAND_EDGES == (1.25, 1.6, 2.0, 2.5, 3.15, 4.0)
    steps = np.diff(np.log(BAND_EDGES))
    np.testing.assert_allclose(steps, np.log(10) / 10, rtol=0.08)  # R10 preferred numbers: about 1 dB apart
    ratios = [0.3, 1.0, 1.25, 1.2501, 1.6, 1.61, 2.0, 2.5, 3.15, 3.2, 4.0, 4.01, 100.0, np.nan]
    assert list(band_of(ratios)) == ["A", "A", "A", "B", "B", "C", "C", "D", "E", "F", "F", "G", "G", None]


def test_band_edges_text_and_colours_follow_the_bands():
    assert band_edges_text() == "A <= 1.25, B <= 1.6, C <= 2, D <= 2.5, E <= 3.15, F <= 4, G > 4"
    assert band_edges_text("≤").startswith("A ≤ 1.25, B ≤ 1.6")
    assert list(BAND_COLOURS) == list(BANDS) and len(set(BAND_COLOURS.values())) == len(BANDS)


@pytest.fixture(scope="module")
def fit():
    rng = np.random.default_rng(7)
    a = np.linspace(62.0, 88.0, 14)
    frontier = pd.DataFrame(
        {
            "top1": a,
            "energy_per_image_j": 0.05 * np.exp(0.12 * (a - 80) + rng.normal(0, 0.02, 14)),
            "energy_per_image_ci95_j": 0.0,
        }
    )
    return fit_frontier(frontier)


def placed(fit, ratios, top1, rel_ci) -> pd.DataFrame:
    top1 = np.asarray(top1, float)
    energy = np.asarray(ratios) * fit.predict_energy_j(top1)
    return pd.DataFrame(
        {"top1": top1, "energy_per_image_j": energy, "energy_per_image_ci95_j": energy * rel_ci},
        index=[f"m{i}" for i in range(len(top1))],
    )


def test_hand_placed_models_get_their_bands(fit):
    ratios = [0.9, 1.1, 1.4, 1.8, 2.2, 2.8, 3.5, 5.0]
    df = placed(fit, ratios, top1=np.linspace(64, 86, len(ratios)), rel_ci=0.01)
    scores = score_models(df, fit)
    assert list(scores.index) == list(df.index)
    assert list(scores["band"]) == ["A", "A", "B", "C", "D", "E", "F", "G"]
    np.testing.assert_allclose(scores["ratio"], ratios, rtol=1e-9)
    np.testing.assert_allclose(scores["ratio_low"], np.array(ratios) * 0.99, rtol=1e-9)
    np.testing.assert_allclose(scores["ratio_high"], np.array(ratios) * 1.01, rtol=1e-9)
    assert not scores["straddles"].any() and (scores["band_low"] == scores["band"]).all()
    assert (scores["score_version"] == SCORE_VERSION).all()


def test_an_interval_across_an_edge_straddles(fit):
    df = placed(fit, [1.22, 1.22, 3.9], top1=[70.0, 75.0, 80.0], rel_ci=np.array([0.05, 0.01, 0.05]))
    scores = score_models(df, fit)
    assert list(scores["band"]) == ["A", "A", "F"]
    assert list(scores["straddles"]) == [True, False, True]
    assert list(scores["band_low"]) == ["A", "A", "F"] and list(scores["band_high"]) == ["B", "A", "G"]


def test_accuracy_outside_the_frontier_is_compared_with_its_end(fit):
    low, high = fit.top1_range_pct
    df = pd.DataFrame(
        {
            "top1": [low - 5.0, low, high + 1.0, np.nan],
            "energy_per_image_j": [1.0, 1.0, 1.0, 1.0],
            "energy_per_image_ci95_j": [0.0, 0.0, 0.0, 0.0],
        }
    )
    scores = score_models(df, fit)
    assert scores["ratio"].iloc[0] == pytest.approx(scores["ratio"].iloc[1])
    assert list(scores["extrapolated"]) == [True, False, True, False]
    assert np.isnan(scores["ratio"].iloc[3]) and pd.isna(scores["band"].iloc[3]) and not scores["straddles"].iloc[3]


def test_without_a_fit_the_rows_own_frontier_is_used(fit):
    df = placed(fit, [1.0, 1.0, 1.0, 2.2, 3.0], top1=[65.0, 75.0, 85.0, 70.0, 80.0], rel_ci=0.0)
    scores = score_models(df)
    own = fit_frontier(df)
    np.testing.assert_allclose(scores["frontier_energy_j"], own.predict_energy_j(df["top1"]))


def test_score_formula_states_version_edges_and_why():
    text = score_formula()
    assert f"version {SCORE_VERSION}" in text
    for edge in ("1.25", "1.6", "2", "2.5", "3.15", "4"):
        assert f"<= {edge}" in text
    assert "AI Energy Score" in text and "straddl" in text
