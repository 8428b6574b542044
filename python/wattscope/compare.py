"""`wattscope compare old.json new.json`: per-region energy change with a significance test, as a CI gate.

For each region in both files the trials' values of ``--metric`` (default ``energy_j``) are compared:

* at least two trials on each side: Welch's t-test (unequal variances), two-sided p-value from Student's t
  distribution, computed here through the regularised incomplete beta function (no scipy);
* fewer: a z-test against the measurements' own stated uncertainties (``uncertainty_j``, one-sigma-like, added in
  quadrature). This ignores run-to-run variation, so it finds more changes significant than a test on trials would:
  record several trials (`wattscope run --repeat N`, a benchmark's rounds) for a real test.

A region *regresses* when the observed relative change of the mean exceeds ``--threshold`` and the one-sided
p-value for an increase (``p_increase``: half the two-sided p when the mean rose, one minus that half otherwise) is
below ``--alpha``. The threshold applies to the observed change, not to a tested bound. Trials whose value is not a
finite number (NaN is written as null: RAPL unreadable, no readings) are skipped, with a note per region; a region
in both files with no finite value left on a side is an error. A region in both files that could not be tested (one
trial per side and no stated uncertainty for the metric) is shown as *untested* and never gates.

Exit 1 if any region regresses; 2 on bad input, or when no region in both files could be tested; 0 otherwise.
Improvements, untested regions and regions present on one side only are reported, never gating.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .embed.results_file import ResultsFileError, load_results

__all__ = ["RegionChange", "WelchResult", "compare_files", "compare_regions", "regularized_incomplete_beta",
           "student_t_two_sided_p", "welch_t_test"]

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITERATIONS = 100_000


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1, by the continued fraction (modified Lentz) on the side where it
    converges fast, x < (a + 1) / (a + b + 2), and the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) on the other."""
    if not (a > 0 and b > 0):
        raise ValueError(f"the incomplete beta needs a > 0 and b > 0, got a={a!r}, b={b!r}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"the incomplete beta needs 0 <= x <= 1, got {x!r}")
    return _incomplete_beta(a, b, x, 1.0 - x)


def _incomplete_beta(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) with ``y`` = 1 - x given by the caller, exactly where it can (the t tail near t = 0)."""
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    def clamp(v: float) -> float:
        return v if abs(v) > _TINY else _TINY

    c = 1.0
    d = 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, _MAX_ITERATIONS + 1):
        # Even step, then odd step, of the continued fraction for I_x(a, b).
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / clamp(1.0 + num * d)
        c = clamp(1.0 + num / c)
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 / clamp(1.0 + num * d)
        c = clamp(1.0 + num / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"the incomplete beta's continued fraction did not converge (a={a}, b={b}, x={x})")


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    if math.isinf(t):
        return 0.0
    t2 = t * t
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


@dataclass(frozen=True)
class WelchResult:
    t: float  # (mean_b - mean_a) / standard error of the difference
    df: float  # Welch-Satterthwaite degrees of freedom
    p_value: float  # two-sided


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Welch's two-sample t-test of mean(b) - mean(a); each sample needs at least two values."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per sample, got {len(a)} and {len(b)}")
    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    sa, sb = var_a / len(a), var_b / len(b)
    se2 = sa + sb
    diff = mean_b - mean_a
    if se2 == 0.0:
        # Identical trials on both sides: any difference at all is certain, none is no evidence.
        return WelchResult(math.copysign(math.inf, diff) if diff else 0.0, float(len(a) + len(b) - 2),
                           0.0 if diff else 1.0)
    df = se2**2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    t = diff / math.sqrt(se2)
    return WelchResult(t, df, student_t_two_sided_p(t, df))


def _mean_var(x: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(x) / len(x)
    return mean, math.fsum((v - mean) ** 2 for v in x) / (len(x) - 1)


@dataclass(frozen=True)
class RegionChange:
    """One region of a comparison. ``change`` is (new - old) / old of the trial means; ``method`` is ``"welch"``,
    ``"uncertainty"`` (too few trials: z-test on the stated uncertainties), or ``"none"`` (one side only, or no
    uncertainty to test against); ``p_value`` (two-sided) and ``p_increase`` (one-sided, for a rise) are None when
    nothing was tested."""

    region: str
    metric: str
    old_mean: float | None
    old_sd: float | None
    old_n: int
    new_mean: float | None
    new_sd: float | None
    new_n: int
    change: float | None
    p_value: float | None
    method: str
    regression: bool
    improvement: bool
    p_increase: float | None = None  # one-sided: the evidence that the mean rose, which the gate uses
    notes: tuple[str, ...] = ()  # trials skipped (no finite value)

    @property
    def verdict(self) -> str:
        if not self.new_n:
            return "only in old"
        if not self.old_n:
            return "only in new"
        if self.p_value is None:
            return "untested"
        return "REGRESSION" if self.regression else "improved" if self.improvement else "ok"


def compare_regions(old: dict[str, list[dict]], new: dict[str, list[dict]], *, metric: str = "energy_j",
                    threshold: float = 0.05, alpha: float = 0.05) -> list[RegionChange]:
    """Compare the regions of two loaded results files (``results_file.load_results``)."""
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a non-negative fraction, got {threshold!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    _check_metric_exists(old, new, metric)
    out = []
    for region in list(old) + [r for r in new if r not in old]:
        a, notes_a = _values(old.get(region, []), metric)
        b, notes_b = _values(new.get(region, []), metric)
        notes = tuple([f"old: {n}" for n in notes_a] + [f"new: {n}" for n in notes_b])
        if region in old and region in new:
            for side, values in (("old", a), ("new", b)):
                if not values:
                    raise ValueError(f"region {region!r}: no trial in the {side} file has a finite {metric!r} "
                                     f"({'; '.join(notes)})")
        mean_a, sd_a = _summary(a)
        mean_b, sd_b = _summary(b)
        if not a or not b:
            out.append(RegionChange(region, metric, mean_a, sd_a, len(a), mean_b, sd_b, len(b), None, None, "none",
                                    False, False, None, notes))
            continue
        assert mean_a is not None and mean_b is not None
        change = (mean_b - mean_a) / abs(mean_a) if mean_a else (0.0 if mean_b == mean_a else math.inf)
        if len(a) >= 2 and len(b) >= 2:
            p: float | None = welch_t_test(a, b).p_value
            method = "welch"
        else:
            p = _uncertainty_p([t for t in old[region] if _finite(t.get(metric))],
                               [t for t in new[region] if _finite(t.get(metric))], metric, mean_b - mean_a)
            method = "uncertainty" if p is not None else "none"
        if p is None:
            out.append(RegionChange(region, metric, mean_a, sd_a, len(a), mean_b, sd_b, len(b), change, None, method,
                                    False, False, None, notes))
            continue
        # The question is one-sided ("did it rise?"): the two-sided p halves on the side the mean moved to.
        p_up = p / 2 if mean_b > mean_a else 1.0 - p / 2
        out.append(RegionChange(region, metric, mean_a, sd_a, len(a), mean_b, sd_b, len(b), change, p, method,
                                change > threshold and p_up < alpha, change < -threshold and 1.0 - p_up < alpha,
                                p_up, notes))
    return out


def _check_metric_exists(old: dict[str, list[dict]], new: dict[str, list[dict]], metric: str) -> None:
    keys = {k for side in (old, new) for trials in side.values() for t in trials for k in t}
    if metric not in keys:
        numeric = sorted(k for side in (old, new) for trials in side.values() for t in trials for k, v in t.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ValueError(f"no trial has the key {metric!r}; the keys that exist: {', '.join(dict.fromkeys(numeric))}")


def _values(trials: list[dict], metric: str) -> tuple[list[float], list[str]]:
    """The finite values of ``metric``, and a note for each trial skipped."""
    values, notes = [], []
    for i, trial in enumerate(trials):
        v = trial.get(metric)
        if not _finite(v):
            notes.append(f"trial {i} skipped: {metric!r} is {'missing' if metric not in trial else repr(v)}, "
                         "not a finite number")
            continue
        values.append(float(v))
    return values, notes


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _summary(x: list[float]) -> tuple[float | None, float | None]:
    if not x:
        return None, None
    if len(x) == 1:
        return x[0], None
    mean, var = _mean_var(x)
    return mean, math.sqrt(var)


def _uncertainty_p(old: list[dict], new: list[dict], metric: str, diff: float) -> float | None:
    """Two-sided normal p-value of ``diff`` against the trials' stated uncertainties (energy metrics only)."""
    unc_key = {"energy_j": "uncertainty_j"}.get(metric)
    if unc_key is None:
        return None
    sigmas = []
    for trials in (old, new):
        u = [t.get(unc_key) for t in trials]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in u):
            return None
        # The mean's uncertainty: the per-trial terms are not independent (same sensor), so no 1/sqrt(n).
        sigmas.append(math.fsum(u) / len(u))
    sigma = math.hypot(*sigmas)
    if sigma == 0.0:
        return 0.0 if diff else 1.0
    return math.erfc(abs(diff) / sigma / math.sqrt(2.0))


def compare_files(old_path: str | Path, new_path: str | Path, **options: float | str) -> list[RegionChange]:
    """Load two results files and compare them (see ``compare_regions`` for the options)."""
    return compare_regions(load_results(old_path), load_results(new_path), **options)  # type: ignore[arg-type]


def render(changes: list[RegionChange], *, threshold: float, alpha: float) -> str:
    metric = changes[0].metric if changes else "energy_j"
    rows = [("region", f"old {metric}", f"new {metric}", "change", "p(increase)", "test", "verdict")]
    for c in changes:
        rows.append((c.region, _fmt(c.old_mean, c.old_sd, c.old_n), _fmt(c.new_mean, c.new_sd, c.new_n),
                     "" if c.change is None else f"{c.change:+.2%}",
                     "" if c.p_increase is None else f"{c.p_increase:.3g}", c.method, c.verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    n_bad = sum(c.regression for c in changes)
    lines.append(f"{n_bad} regression(s): observed change > {threshold:.1%} with one-sided p(increase) < {alpha:g}"
                 + ("" if all(c.method == "welch" for c in changes if c.old_n and c.new_n) else
                    "; 'uncertainty' = too few trials, tested against the stated uncertainties only; 'untested' = "
                    "one trial a side and no uncertainty for this metric: record more trials"))
    lines += [f"note: {c.region}: {n}" for c in changes for n in c.notes]
    return "\n".join(lines)


def _fmt(mean: float | None, sd: float | None, n: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4g}" + (f" ± {sd:.2g}" if sd is not None else "") + f" (n={n})"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="per-region energy change between two results files, with a significance test (a CI gate)",
        description="Compare the regions of two results files (wattscope run -o, pytest --wattscope-json, or "
        "Measurement.to_json()). Exit 1 if a region's mean rose by more than --threshold (the observed change) with "
        "a one-sided p < --alpha for an increase (Welch t-test on the trials; with one trial a side, a z-test on the "
        "stated uncertainties); 2 on bad input or when no region in both files could be tested (shown as "
        "'untested'); 0 otherwise. Trials with a non-finite value (null) are skipped, with a note.",
    )
    p.add_argument("old", help="the baseline results file")
    p.add_argument("new", help="the results file to check")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="observed relative increase of the mean that fails the gate when the increase is significant "
                   "(default 0.05 = 5%%)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the one-sided test for an increase (default 0.05)")
    p.add_argument("--metric", default="energy_j", help="the trial key to compare (default energy_j)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        changes = compare_files(args.old, args.new, metric=args.metric, threshold=args.threshold, alpha=args.alpha)
    except (ResultsFileError, ValueError) as e:
        print(f"wattscope compare: {e}", file=sys.stderr)
        return 2
    if not any(c.old_n and c.new_n for c in changes):
        print("wattscope compare: the files have no region in common", file=sys.stderr)
        print(render(changes, threshold=args.threshold, alpha=args.alpha))
        return 2
    if not any(c.p_value is not None for c in changes):
        print("wattscope compare: no region could be tested (one trial a side and no stated uncertainty for "
              f"{args.metric!r}): record several trials, e.g. wattscope run --repeat 5", file=sys.stderr)
        print(render(changes, threshold=args.threshold, alpha=args.alpha))
        return 2
    print(render(changes, threshold=args.threshold, alpha=args.alpha))
    return 1 if any(c.regression for c in changes) else 0
