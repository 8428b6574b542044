"""What energy per image goes with: log-log regressions on a model's compute, size and input, and its family.

Within one configuration slice, ``ln E`` (E: J per image) is regressed on the log of each factor alone (GMACs,
activations, parameters, input size: the slope is an elasticity, % energy per % factor), on all of them together
(partial effects: each slope with the others held fixed, and each factor's partial R², the share of the variance
left by the others that it explains), and on the family alone (one-way R²). Intervals are t intervals of OLS.

Each model is one point: results of one model and configuration from several boards of the GPU model are combined
first (``combine_boards``), so that a second board does not count a model twice. Results whose energy is not a
positive finite number are left out, with an ``AnalysisWarning`` naming them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .results import combine_boards, usable_energy

FACTORS = {"gmacs": "gmacs", "activations": "activations_m", "params": "params_m", "img_size": "img_size"}


@dataclass(frozen=True, eq=False)
class FactorReport:
    """``regressions``: one row per factor (``factor``, ``slope``, ``slope_ci95`` (low, high), ``r2``, ``n``),
    the family's one-way fit last (no slope; R² NaN when no family has two models); ``multiple``: the joint
    regression (``factor``, ``slope``, ``slope_ci95``, ``partial_r2``), with ``multiple_r2`` and ``multiple_n``
    (factors that do not vary in the data are left out of it); ``energy_per_gmac_by_family``: ``family``,
    ``n_models``, ``energy_per_gmac_j`` (geometric mean of J per GMAC, i.e. nJ per MAC), ``ci95_low``,
    ``ci95_high``, cheapest first."""

    regressions: pd.DataFrame
    multiple: pd.DataFrame
    multiple_r2: float
    multiple_n: int
    energy_per_gmac_by_family: pd.DataFrame


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(coefficients, their 95 % half-widths, RSS, R²) of y on [1, x]."""
    design = np.column_stack([np.ones(len(y)), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = float(np.sum((y - design @ coef) ** 2))
    tss = float(np.sum((y - y.mean()) ** 2))
    dof = len(y) - design.shape[1]
    if dof > 0:
        cov = rss / dof * np.linalg.pinv(design.T @ design)
        half = stats.t.ppf(0.975, dof) * np.sqrt(np.maximum(np.diag(cov), 0.0))
    else:
        half = np.full(design.shape[1], np.nan)
    return coef, half, rss, (1.0 - rss / tss) if tss > 0 else math.nan


def factors(df: pd.DataFrame) -> FactorReport:
    """Regress ln(energy per image) on the factors of ``df``'s rows (pass one configuration slice); ``n`` counts
    models (see the module docstring)."""
    df = combine_boards(usable_energy(df, "factors"))
    y_all = np.log(df["energy_per_image_j"].to_numpy(float))
    rows = []
    for name, column in FACTORS.items():
        x = np.log(df[column].to_numpy(float))
        ok = np.isfinite(x) & np.isfinite(y_all)
        if ok.sum() < 3 or np.ptp(x[ok]) == 0:
            rows.append(
                {
                    "factor": name,
                    "slope": math.nan,
                    "slope_ci95": (math.nan, math.nan),
                    "r2": math.nan,
                    "n": int(ok.sum()),
                }
            )
            continue
        coef, half, _, r2 = _ols(x[ok], y_all[ok])
        rows.append(
            {
                "factor": name,
                "slope": float(coef[1]),
                "slope_ci95": (float(coef[1] - half[1]), float(coef[1] + half[1])),
                "r2": r2,
                "n": int(ok.sum()),
            }
        )
    rows.append(_family_row(df["family"], y_all))
    multiple, multiple_r2, multiple_n = _multiple(df, y_all)
    return FactorReport(
        regressions=pd.DataFrame(rows),
        multiple=multiple,
        multiple_r2=multiple_r2,
        multiple_n=multiple_n,
        energy_per_gmac_by_family=_per_gmac(df),
    )


def _family_row(family: pd.Series, y: np.ndarray) -> dict:
    """The one-way fit of ln E on family. Its R² is NaN unless some family has at least two models: with one model
    per family the family explains everything and says nothing."""
    ok = np.isfinite(y) & family.notna().to_numpy()
    yy, fam = y[ok], family[ok].to_numpy()
    r2 = math.nan
    if len(yy) > len(set(fam)):
        tss = float(np.sum((yy - yy.mean()) ** 2))
        means = pd.Series(yy).groupby(fam).transform("mean").to_numpy()
        r2 = 1.0 - float(np.sum((yy - means) ** 2)) / tss if tss > 0 else math.nan
    return {"factor": "family", "slope": math.nan, "slope_ci95": (math.nan, math.nan), "r2": r2, "n": int(ok.sum())}


def _multiple(df: pd.DataFrame, y_all: np.ndarray) -> tuple[pd.DataFrame, float, int]:
    columns = ["factor", "slope", "slope_ci95", "partial_r2"]
    logs = {name: np.log(df[col].to_numpy(float)) for name, col in FACTORS.items()}
    ok = np.isfinite(y_all)
    for x in logs.values():
        ok &= np.isfinite(x)
    names = [n for n, x in logs.items() if ok.sum() and np.ptp(x[ok]) > 0]
    n = int(ok.sum())
    if not names or n <= len(names) + 1:
        return pd.DataFrame(columns=columns), math.nan, n
    x = np.column_stack([logs[name][ok] for name in names])
    y = y_all[ok]
    coef, half, rss_full, r2 = _ols(x, y)
    rows = []
    for i, name in enumerate(names):
        others = np.delete(x, i, axis=1)
        rss_without = _ols(others, y)[2] if others.shape[1] else float(np.sum((y - y.mean()) ** 2))
        partial = (rss_without - rss_full) / rss_without if rss_without > 0 else math.nan
        rows.append(
            {
                "factor": name,
                "slope": float(coef[i + 1]),
                "slope_ci95": (float(coef[i + 1] - half[i + 1]), float(coef[i + 1] + half[i + 1])),
                "partial_r2": partial,
            }
        )
    return pd.DataFrame(rows, columns=columns), r2, n


def _per_gmac(df: pd.DataFrame) -> pd.DataFrame:
    per = df["energy_per_image_j"].to_numpy(float) / df["gmacs"].to_numpy(float)
    data = pd.DataFrame({"family": df["family"].to_numpy(), "log": np.log(per)})
    data = data[np.isfinite(data["log"])]
    rows = []
    for family, g in data.groupby("family", sort=True):
        logs = g["log"].to_numpy()
        mean = float(logs.mean())
        n = len(logs)
        half = float(stats.t.ppf(0.975, n - 1) * logs.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        rows.append(
            {
                "family": family,
                "n_models": n,
                "energy_per_gmac_j": math.exp(mean),
                "ci95_low": math.exp(mean - half),
                "ci95_high": math.exp(mean + half),
            }
        )
    out = pd.DataFrame(rows, columns=["family", "n_models", "energy_per_gmac_j", "ci95_low", "ci95_high"])
    return out.sort_values("energy_per_gmac_j").reset_index(drop=True)
