"""The energy-efficiency score: how many times more energy a model uses than the frontier at its accuracy, banded.

Version ``SCORE_VERSION`` (any change to the formula or the edges bumps it):

    ratio = E / F(top1)     E: the model's energy per image (J) in its configuration,
                            F: the fitted frontier's energy at the same top-1 accuracy (``FrontierFit``),
                               with top-1 clamped to the accuracies the frontier covers.
    band  = A if ratio <= 1.25, B <= 1.6, C <= 2.0, D <= 2.5, E <= 3.15, F <= 4.0, else G.

The edges are fixed ratios, spaced by a constant factor of about 1.26 (10^0.1: the R10 preferred numbers, one
decibel apart), so each band is an equal step in log energy and a band means the same excess everywhere on the
accuracy range. The measurement's 95 % interval of E (``energy_per_image_ci95_j``) gives ``ratio_low`` /
``ratio_high`` and their bands; a model whose interval crosses an edge ``straddles``. The frontier's own fit
uncertainty is not in these intervals: it is shared by all models near an accuracy and does not reorder them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .fit import FrontierFit, fit_frontier
from .results import has_usable_energy, usable_energy

SCORE_VERSION = "1"
BANDS = ("A", "B", "C", "D", "E", "F", "G")
BAND_EDGES = (1.25, 1.6, 2.0, 2.5, 3.15, 4.0)  # upper ratio of bands A..F; G is above the last
# The figures' and the web app's colour of each band (the app gets them in its data): ColorBrewer's RdYlGn, with
# B, C and D darker than its pale middle so that points in those bands stay visible on white.
BAND_COLOURS = {"A": "#1a9850", "B": "#66bd63", "C": "#a6d96a", "D": "#e9d24b", "E": "#fdae61", "F": "#f46d43",
                "G": "#d73027"}


def band_edges_text(le: str = "<=") -> str:
    """The bands with their edges on one line, ``le`` the sign for "at most": ``A <= 1.25, B <= 1.6, ..., G > 4``."""
    return ", ".join([*(f"{b} {le} {e:g}" for b, e in zip(BANDS, BAND_EDGES, strict=False)),
                      f"{BANDS[-1]} > {BAND_EDGES[-1]:g}"])


def band_of(ratio: np.ndarray | float) -> np.ndarray:
    """The band letter of each ratio (an edge belongs to the better band); None where the ratio is NaN."""
    r = np.atleast_1d(np.asarray(ratio, dtype=float))
    idx = np.searchsorted(np.asarray(BAND_EDGES), r, side="left")
    letters = np.array(BANDS, dtype=object)[np.minimum(idx, len(BANDS) - 1)]
    letters[~np.isfinite(r)] = None
    return letters


def score_models(df: pd.DataFrame, fit: FrontierFit | None = None) -> pd.DataFrame:
    """The score of every row of ``df`` (same index): ``frontier_energy_j``, ``ratio``, ``ratio_low``,
    ``ratio_high``, ``band``, ``band_low`` (the band of ``ratio_low``: the best the model may be), ``band_high``,
    ``straddles`` (``band_low != band_high``), ``extrapolated`` (top-1 outside the frontier's range: compared with
    the frontier's end) and ``score_version``. Rows without an accuracy get NaN ratios and a missing band
    (None); so do rows whose energy is not a positive finite number (a zero energy is no ratio of 0, band A), with
    an ``AnalysisWarning`` naming them. Every row is scored on its own, so a model measured on two boards has a
    score per board; ``score_models(combine_boards(df), fit)`` scores each model once.

    ``fit``: the frontier to compare with; None fits ``df``'s own frontier (pass one configuration slice then).
    """
    usable = has_usable_energy(df)
    rows = usable_energy(df, "score")  # warns, naming the rows without a score
    if fit is None:
        fit = fit_frontier(rows)
    top1 = df["top1"].to_numpy(float)
    energy_j = np.where(usable, df["energy_per_image_j"].to_numpy(float), np.nan)
    ci_j = np.nan_to_num(df["energy_per_image_ci95_j"].to_numpy(float), nan=0.0)
    frontier_j = np.full(len(df), np.nan)
    known = np.isfinite(top1) & usable
    frontier_j[known] = fit.predict_energy_j(top1[known])
    ratio = energy_j / frontier_j
    ratio_low = np.maximum(energy_j - ci_j, 0.0) / frontier_j
    ratio_high = (energy_j + ci_j) / frontier_j
    band, band_low, band_high = band_of(ratio), band_of(ratio_low), band_of(ratio_high)
    low, high = fit.top1_range_pct
    return pd.DataFrame(
        {
            "frontier_energy_j": frontier_j,
            "ratio": ratio,
            "ratio_low": ratio_low,
            "ratio_high": ratio_high,
            "band": band,
            "band_low": band_low,
            "band_high": band_high,
            "straddles": known & (band_low != band_high),
            "extrapolated": known & ((top1 < low) | (top1 > high)),
            "score_version": SCORE_VERSION,
        },
        index=df.index,
    )


def score_formula() -> str:
    """The formula and band edges in a few lines of plain text (for the app and the README)."""
    edges = ", ".join(f"{b} <= {e:g}" for b, e in zip(BANDS, BAND_EDGES, strict=False))
    return (
        f"wattscope energy-efficiency score, version {SCORE_VERSION}\n"
        "ratio = E / F(top1): the model's energy per image divided by the energy of the fitted accuracy-energy "
        "frontier (same GPU and configuration) at the model's top-1 accuracy; 1 means on the frontier.\n"
        f"Bands by ratio: {edges}, G above {BAND_EDGES[-1]:g}. The edges are fixed and log-spaced (x1.26 each), so "
        "a band means the same excess energy at any accuracy.\n"
        "Uncertainty: the 95 % interval of the measured energy gives a ratio interval; a model whose interval "
        "crosses a band edge is marked as straddling it (e.g. B-C).\n"
        "Why not AI Energy Score's five equal slices of the observed range: those edges move whenever a model is "
        "added at either end, so a model's grade changes without it changing. Here the edges never move: a "
        "model's band depends only on its own energy and on the fitted frontier, which changes only when a model "
        "joins the frontier (a model added above it changes no other band), and models are compared at equal "
        "accuracy instead of a small model against a large one."
    )
