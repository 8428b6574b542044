"""How energy grows with accuracy along the frontier: three forms fitted to the same response, compared by AIC.

Every form models ``y = ln E`` (E: J per image) as a function of top-1 accuracy ``a`` (%) with Gaussian errors of
one variance, so their likelihoods, AIC, AICc and BIC are comparable. Accuracy is measured from ``A_REF_PCT`` = 80 %
so that intercepts read as energies at 80 % top-1, a point inside every ImageNet frontier.

- ``exponential``: ``ln E = ln e80 + beta (a - 80)``; energy multiplies by ``exp(beta)`` per accuracy point.
- ``power_law``: ``ln E = ln e80 - k ln((100 - a) / 20)``, i.e. ``E ~ err^-k`` in the error rate ``err = 100 - a``.
  A power law in the error rate, not in accuracy: over ImageNet's 60-90 % range ``ln a`` is nearly linear in ``a``,
  so a power law in accuracy could not be told from the exponential, whereas ``err^-k`` is the neural scaling-law
  shape (error falling as a power of compute) and diverges as accuracy nears 100 %.
- ``double_exponential``: ``ln ln(E / e0) = alpha + beta (a - 80)``, i.e. ``ln E = ln e0 + exp(alpha + beta (a - 80))``
  with ``e0 > 0`` (J), ``beta > 0``: the log of energy itself grows exponentially (the study's finding). Fitted as
  written on the right, so it is defined for every point (``E <= e0`` needs no special case); ``e0`` is the energy
  floor the curve approaches at low accuracy. As ``beta -> 0`` it tends to the exponential, which is its limit.

The linear forms are ordinary least squares with exact t intervals. The double exponential is fitted by profiling:
for a fixed ``beta`` it is linear in ``(ln e0, exp(alpha))``, so the fit is a one-dimensional search over ``beta``;
its 95 % intervals are profile-likelihood intervals calibrated with F(1, n - 3), the same calibration that gives the
t intervals of the linear forms. An interval that reaches the exponential limit is open on that side (``e0`` down to
0, ``alpha`` up to +inf, ``beta`` down to 0): the data then cannot tell the curvature from none.

Which form the data supports is decided by AICc (AIC corrected for few points; it becomes AIC as n grows), with
Burnham and Anderson's reading of its differences, and only with at least ``MIN_POINTS_TO_DECIDE`` frontier points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .frontier import pareto_frontier
from .results import ResultsError, combine_boards, usable_energy

A_REF_PCT = 80.0
FORMS = ("double_exponential", "exponential", "power_law")
MIN_POINTS = 3  # a frontier with fewer points is not fitted at all
MIN_POINTS_TO_DECIDE = 8  # below this, the verdict says the data cannot decide whatever AICc says
# AICc differences (runner-up minus best): below WEAK the forms are not distinguished; then weakly, clearly,
# strongly (Burnham & Anderson 2002: < 2 substantial support for both, 4-7 considerably less, > 10 essentially none).
DELTA_WEAK, DELTA_CLEAR, DELTA_STRONG = 2.0, 6.0, 10.0
_LEVEL = 0.95
_OPEN_SPAN = 50.0  # how far (in ln e0 or alpha) a profile is followed before its interval is called open


@dataclass(frozen=True)
class _Form:
    """One fitted form: parameters with their intervals, and the fitted curve of ln E."""

    name: str
    params: dict[str, float]
    params_ci95: dict[str, tuple[float, float]]
    rss: float
    n: int
    n_params: int  # of the curve; the variance is one more
    log_energy: Callable[[np.ndarray], np.ndarray]
    note: str = ""


@dataclass(frozen=True, eq=False)
class FrontierFit:
    """The fit of ln(energy per image) against top-1 accuracy along a Pareto frontier.

    ``best``: the form with the lowest AICc; ``forms``: one row per form (``form``, ``params``, ``params_ci95``
    (dicts; intervals as (low, high)), ``aic``, ``aicc``, ``bic``, ``delta_aicc`` (to the best), ``r2`` and
    ``rmse_log`` (of ln E), ``n``, ``note``); ``verdict``: which form the data supports, in words; ``frontier``:
    the points fitted (``unit_key``, ``top1``, ``energy_per_image_j``, ...). ``top1_range_pct``: the accuracies
    the fit covers; predictions outside it are clamped to its ends.
    """

    best: str
    forms: pd.DataFrame
    verdict: str
    frontier: pd.DataFrame
    top1_range_pct: tuple[float, float]
    _fits: dict[str, _Form] = field(repr=False)

    def predict_energy_j(self, top1: np.ndarray | float, form: str | None = None) -> np.ndarray:
        """The frontier's energy per image (J) at top-1 accuracies (%), by the best form (or ``form``); accuracies
        outside ``top1_range_pct`` are clamped to it (the fit says nothing beyond its points)."""
        fit = self._fits[form or self.best]
        a = np.clip(np.asarray(top1, dtype=float), *self.top1_range_pct)
        return np.exp(fit.log_energy(a))

    def curve(self, n: int = 200, form: str | None = None) -> pd.DataFrame:
        """``n`` points (``top1``, ``energy_per_image_j``) of the fitted frontier over ``top1_range_pct``."""
        top1 = np.linspace(*self.top1_range_pct, n)
        return pd.DataFrame({"top1": top1, "energy_per_image_j": self.predict_energy_j(top1, form)})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: non-finite numbers (open intervals, undefined AICc) become None."""
        forms = []
        for row in self.forms.to_dict("records"):
            forms.append({k: _jsonable(v) for k, v in row.items()})
        cols = [c for c in ("unit_key", "config_key", "top1", "energy_per_image_j") if c in self.frontier.columns]
        return {
            "best": self.best,
            "verdict": self.verdict,
            "accuracy_ref_pct": A_REF_PCT,
            "top1_range_pct": list(self.top1_range_pct),
            "forms": forms,
            "frontier": [{k: _jsonable(v) for k, v in r.items()} for r in self.frontier[cols].to_dict("records")],
        }


def fit_frontier(df: pd.DataFrame) -> FrontierFit:
    """Fit the three forms to the Pareto frontier of ``df`` (top-1 against energy per image) and compare them.

    Pass one configuration slice (``select_slice``): across configurations the frontier mixes precisions. Rows
    whose energy is not a positive finite number have no ln E: they are left out with an ``AnalysisWarning`` naming
    them. A model measured on several boards of the GPU model is one point (``combine_boards``: the geometric mean
    of its boards' energies), so a second board neither adds points nor lets the cheaper board's noise pull the
    frontier down. Raises ResultsError when the frontier has fewer than ``MIN_POINTS`` points (its points always
    differ in accuracy: of equally accurate models only the cheapest is on it).
    """
    frontier = pareto_frontier(combine_boards(usable_energy(df, "frontier fit")))
    n = len(frontier)
    if n < MIN_POINTS:
        raise ResultsError(
            f"the accuracy-energy frontier has {n} model{'s' if n != 1 else ''}; a fit needs at least {MIN_POINTS}. "
            "Measure more models (models without a timm accuracy do not count)."
        )
    a = frontier["top1"].to_numpy(float)
    y = np.log(frontier["energy_per_image_j"].to_numpy(float))
    fits = {
        "double_exponential": _fit_double_exponential(a, y),
        "exponential": _fit_linear("exponential", a - A_REF_PCT, y),
        "power_law": _fit_linear("power_law", np.log((100.0 - a) / (100.0 - A_REF_PCT)), y),
    }
    table = _compare(fits, y)
    best = _best(table)
    table["delta_aicc"] = table["aicc"] - table.loc[table["form"] == best, "aicc"].iloc[0]
    return FrontierFit(
        best=best,
        forms=table,
        verdict=_verdict(table, best, n, fits),
        frontier=frontier,
        top1_range_pct=(float(a.min()), float(a.max())),
        _fits=fits,
    )


# --- the forms ---------------------------------------------------------------------------------------------------


def _fit_linear(name: str, x: np.ndarray, y: np.ndarray) -> _Form:
    """OLS of y on (1, x) with t intervals. For the power law x is ln(err / 20) and the slope is -k."""
    n = len(x)
    design = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = float(np.sum((y - design @ coef) ** 2))
    dof = n - 2
    if dof > 0:
        cov = rss / dof * np.linalg.inv(design.T @ design)
        half = stats.t.ppf(0.5 + _LEVEL / 2, dof) * np.sqrt(np.diag(cov))
    else:
        half = np.full(2, np.inf)
    lo, hi = coef - half, coef + half
    e80 = (math.exp(coef[0]), (math.exp(lo[0]), math.exp(hi[0])))
    if name == "exponential":
        params = {"e80_j": e80[0], "beta_per_pt": float(coef[1])}
        ci = {"e80_j": e80[1], "beta_per_pt": (float(lo[1]), float(hi[1]))}

        def log_energy(top1: np.ndarray) -> np.ndarray:
            return coef[0] + coef[1] * (top1 - A_REF_PCT)
    else:
        params = {"e80_j": e80[0], "k": float(-coef[1])}
        ci = {"e80_j": e80[1], "k": (float(-hi[1]), float(-lo[1]))}

        def log_energy(top1: np.ndarray) -> np.ndarray:
            return coef[0] + coef[1] * np.log((100.0 - top1) / (100.0 - A_REF_PCT))

    note = "" if dof > 0 else "no residual degrees of freedom: the line passes through every point"
    return _Form(name, params, ci, rss, n, 2, log_energy, note)


class _DoubleExponential:
    """Least squares of y = c + d exp(beta x) (x = a - 80, c = ln e0, d = exp(alpha) > 0, beta > 0), profiled over
    beta: for fixed beta the model is linear in (c, d). ``rss_*`` return the least RSS over beta with the named
    parameter fixed, and the beta that attains it."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        span = float(np.ptp(x))
        # ln-spaced betas from "no curvature over the data" to e^50 of curvature across it.
        self.log_beta_bounds = (math.log(1e-7 / span), math.log(50.0 / span))
        self.grid = np.linspace(*self.log_beta_bounds, 600)

    def _z(self, log_beta: np.ndarray, shift: bool) -> np.ndarray:
        beta = np.exp(np.atleast_1d(log_beta))[:, None]
        # expm1 keeps exp(beta x) - 1 exact at tiny beta; the constant 1 goes into the intercept where there is one.
        return np.expm1(beta * self.x) if shift else np.exp(beta * self.x)

    def rss_free(self, log_beta: np.ndarray) -> np.ndarray:
        z = self._z(log_beta, shift=True)
        zc = z - z.mean(axis=1, keepdims=True)
        yc = self.y - self.y.mean()
        szz, szy = np.sum(zc * zc, axis=1), zc @ yc
        syy = float(yc @ yc)
        with np.errstate(divide="ignore", invalid="ignore"):
            rss = np.where((szy > 0) & (szz > 0), syy - szy**2 / szz, syy)
        return np.maximum(rss, 0.0)

    def coef_at(self, log_beta: float) -> tuple[float, float]:
        """(c, d) of the least-squares fit at a beta (d > 0 assumed)."""
        z = self._z(np.array([log_beta]), shift=False)[0]
        zc = z - z.mean()
        d = float(zc @ (self.y - self.y.mean()) / (zc @ zc))
        return float(self.y.mean() - d * z.mean()), d

    def rss_c_fixed(self, c: float, log_beta: np.ndarray) -> np.ndarray:
        z = self._z(log_beta, shift=False)
        r = self.y - c
        szz, szr = np.sum(z * z, axis=1), z @ r
        return np.where(szr > 0, float(r @ r) - szr**2 / szz, float(r @ r))

    def rss_alpha_fixed(self, alpha: float, log_beta: np.ndarray) -> np.ndarray:
        r = self.y - math.exp(alpha) * self._z(log_beta, shift=True)
        return np.sum((r - r.mean(axis=1, keepdims=True)) ** 2, axis=1)

    def grid_for_alpha(self, alpha: float) -> np.ndarray:
        """The ln-beta grid for a fixed alpha. A large d = exp(alpha) needs a beta near slope / d to approach the
        exponential limit (d beta x is then the line's slope term), far below the usual grid: without it, the
        profile of alpha would seem to rise at large alpha only because the grid ends."""
        slope_scale = float(np.ptp(self.y)) / float(np.ptp(self.x)) + 1e-12
        low = min(self.log_beta_bounds[0], math.log(1e-4 * slope_scale) - alpha)
        return np.linspace(low, self.log_beta_bounds[1], len(self.grid))

    def minimise(
        self, rss_of: Callable[[np.ndarray], np.ndarray], grid: np.ndarray | None = None
    ) -> tuple[float, float]:
        """(least RSS, its ln beta) over the beta range: a grid, then a bounded refinement around its best."""
        grid = self.grid if grid is None else grid
        values = rss_of(grid)
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        res = optimize.minimize_scalar(
            lambda t: float(rss_of(np.array([t]))[0]), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
        )
        if res.fun < values[i]:
            return float(res.fun), float(res.x)
        return float(values[i]), float(grid[i])


def _fit_double_exponential(a: np.ndarray, y: np.ndarray) -> _Form:
    n, p = len(a), 3
    model = _DoubleExponential(a - A_REF_PCT, y)
    rss, log_beta = model.minimise(model.rss_free)
    c, d = model.coef_at(log_beta)
    lb_lo, lb_hi = model.log_beta_bounds
    note = ""
    if d <= 0 or log_beta <= lb_lo + 1e-6:
        note = "no curvature: the best double exponential is its exponential limit (beta -> 0)"
    alpha = math.log(d) if d > 0 else -math.inf

    def log_energy(top1: np.ndarray) -> np.ndarray:
        return c + d * np.exp(math.exp(log_beta) * (np.asarray(top1, float) - A_REF_PCT))

    params = {"e0_j": math.exp(c), "alpha": alpha, "beta_per_pt": math.exp(log_beta)}
    dof = n - p
    if dof <= 0 or d <= 0:
        ci = {k: (math.nan, math.nan) for k in params}
        if dof <= 0:
            note = "no residual degrees of freedom: the curve passes through every point"
        return _Form("double_exponential", params, ci, rss, n, p, log_energy, note)
    # Profile-likelihood threshold, F-calibrated: RSS may grow by the factor below before a value is rejected.
    limit = rss * (1.0 + stats.f.ppf(_LEVEL, 1, dof) / dof)
    if rss <= 1e-300:
        ci = {k: (v, v) for k, v in params.items()}
        return _Form("double_exponential", params, ci, rss, n, p, log_energy, note)

    def rss_at_c(c_fixed: float) -> float:
        return model.minimise(lambda lb: model.rss_c_fixed(c_fixed, lb))[0]

    def rss_at_alpha(alpha_fixed: float) -> float:
        return model.minimise(lambda lb: model.rss_alpha_fixed(alpha_fixed, lb), model.grid_for_alpha(alpha_fixed))[0]

    c_lo, c_hi = _profile_interval(rss_at_c, c, limit, (c - _OPEN_SPAN, float(y.max())))
    al_lo, al_hi = _profile_interval(rss_at_alpha, alpha, limit, (alpha - _OPEN_SPAN, alpha + _OPEN_SPAN))
    lb_ci = _profile_interval(lambda t: float(model.rss_free(np.array([t]))[0]), log_beta, limit, (lb_lo, lb_hi))
    ci = {
        "e0_j": (math.exp(c_lo) if math.isfinite(c_lo) else 0.0, math.exp(c_hi) if math.isfinite(c_hi) else math.inf),
        "alpha": (al_lo, al_hi),
        "beta_per_pt": (
            math.exp(lb_ci[0]) if math.isfinite(lb_ci[0]) else 0.0,
            math.exp(lb_ci[1]) if math.isfinite(lb_ci[1]) else math.inf,
        ),
    }
    if not note and (ci["beta_per_pt"][0] == 0.0):
        note = "the exponential limit (beta -> 0) is inside the 95 % interval"
    return _Form("double_exponential", params, ci, rss, n, p, log_energy, note)


def _profile_interval(
    rss_at: Callable[[float], float], estimate: float, limit: float, bounds: tuple[float, float]
) -> tuple[float, float]:
    """Where the profile RSS crosses ``limit`` on each side of ``estimate`` (within ``bounds``; an infinite end
    when it does not cross there: the interval is open on that side)."""
    out = []
    for sign, bound in ((-1.0, bounds[0]), (1.0, bounds[1])):
        inside, step = estimate, 1e-3 * max(1.0, abs(estimate))
        crossed = None
        while True:
            probe = estimate + sign * step
            if (probe - bound) * sign >= 0:
                probe = bound
            if rss_at(probe) > limit:
                crossed = probe
                break
            inside = probe
            if probe == bound:
                break
            step *= 2.0
        if crossed is None:
            out.append(sign * math.inf)
        else:
            out.append(
                float(
                    optimize.brentq(lambda v: rss_at(v) - limit, min(inside, crossed), max(inside, crossed), xtol=1e-9)
                )
            )
    return out[0], out[1]


# --- comparison --------------------------------------------------------------------------------------------------


def _compare(fits: dict[str, _Form], y: np.ndarray) -> pd.DataFrame:
    tss = float(np.sum((y - y.mean()) ** 2))
    rows = []
    for name in FORMS:
        f = fits[name]
        k = f.n_params + 1  # the error variance is a parameter too
        n = f.n
        if f.rss > 0:
            loglik_term = n * math.log(f.rss / n)
            aic = loglik_term + 2 * k
            bic = loglik_term + k * math.log(n)
            aicc = aic + 2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.nan
        else:
            aic = bic = aicc = math.nan
        rows.append(
            {
                "form": name,
                "params": f.params,
                "params_ci95": f.params_ci95,
                "aic": aic,
                "aicc": aicc,
                "bic": bic,
                "r2": 1.0 - f.rss / tss if tss > 0 else math.nan,
                "rmse_log": math.sqrt(f.rss / n),
                "n": n,
                "note": f.note,
            }
        )
    return pd.DataFrame(rows)


def _best(table: pd.DataFrame) -> str:
    ranked = table[np.isfinite(table["aicc"].to_numpy(float))].sort_values("aicc")
    # Too few points for AICc to rank anything: the simplest form with the fewest assumptions.
    return str(ranked["form"].iloc[0]) if not ranked.empty else "exponential"


_NAMES = {"double_exponential": "double exponential", "exponential": "exponential", "power_law": "power law"}


def _verdict(table: pd.DataFrame, best: str, n: int, fits: dict[str, _Form]) -> str:
    ranked = table[np.isfinite(table["aicc"].to_numpy(float))].sort_values("aicc")
    if len(ranked) < 2:
        return (
            f"The data cannot decide: {n} frontier points are too few to compare the forms (AICc needs more points "
            f"than parameters + 2). The {_NAMES[best]} is used to draw the frontier."
        )
    runner = str(ranked["form"].iloc[1])
    delta = float(ranked["aicc"].iloc[1] - ranked["aicc"].iloc[0])
    r2 = float(table.loc[table["form"] == best, "r2"].iloc[0])
    numbers = (
        f"{_NAMES[best]} best by AICc, {delta:.1f} below the {_NAMES[runner]} "
        f"(R² of ln E {r2:.2f}, {n} frontier points)"
    )
    if n < MIN_POINTS_TO_DECIDE:
        return (
            f"The data cannot decide: {n} frontier points are too few (a verdict needs {MIN_POINTS_TO_DECIDE}); "
            f"{numbers}. Measure more models to settle it."
        )
    if delta < DELTA_WEAK:
        return f"The data cannot decide between the {_NAMES[best]} and the {_NAMES[runner]}: {numbers}."
    strength = (
        "strongly supports" if delta >= DELTA_STRONG else "supports" if delta >= DELTA_CLEAR else "weakly favours"
    )
    verdict = f"The data {strength} the {_NAMES[best]}: {numbers}."
    de = fits["double_exponential"]
    if best == "double_exponential" and de.params_ci95["beta_per_pt"][0] == 0.0:
        verdict += " Its curvature (beta) is not excluded from 0, so the evidence for a double exponential is thin."
    return verdict


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v
