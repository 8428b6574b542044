"""Fit a sensor response model to readings recorded under a known, GPU-timed load.

Model
-----
A run is one recording of one power source while the GPU followed a commanded schedule of busy intervals (a step,
or a square wave). For a response ``R`` (boxcar or low-pass, with a pure delay; see wattscope.response) the reading
stamped ``t`` in run ``r`` is modelled as ``c_r + s * y_R(t) + noise``, where ``y_R`` is the filtered busy
indicator, ``s = high - low`` the power swing of the load (shared by all runs: it is the same load), and ``c_r`` the
idle level of run ``r``. Each run has its own idle level because the GPU warms during calibration and its leakage
power drifts by a few watts between runs; a shared swing keeps the amplitude of every square wave's response, which
is what pins the filter's time scale down. Reported ``low_w`` is the reading-weighted mean of the ``c_r``.

Fitting
-------
The levels enter linearly, so for each candidate (shape, delay) they are solved in closed form (least squares with
one offset per run and a shared slope) and only the residual sum of squares is kept. Shape and delay are searched
on a coarse grid (shape log-spaced 1 ms .. 1.5 s, delay -5 .. +100 ms in 2.5 ms steps), all delays of one shape at
once, then refined by zooming in (log shape, group delay), where the residual's valley runs along the axes (in
(shape, delay) it runs diagonally: a wider window with a shorter delay reads alike): a 9 x 9 grid spanning one step
either side of the best point (in group delay, the delay step plus what one shape step moves the group delay by),
the step divided by 4 at each of 5 levels (final resolution ~0.03 % in shape, ~3 µs in group delay for a fast
sensor). A candidate whose best swing is not positive explains nothing and scores the variance around the run
means.

Sources polled faster than they update (the instant and average fields, the energy counter) repeat the last value
under newer query stamps; only the first appearance of each value carries timing, so consecutive repeats are dropped
before fitting (``sample_period_ns`` is the median spacing of what remains).

Confidence intervals (95 %, half-widths)
----------------------------------------
Two estimates; the larger is reported, so neither a lucky curvature nor a lucky spread can make it narrow:

* Curvature: the Gauss-Newton covariance ``sigma^2 (J^T J)^-1`` at the optimum, with ``J`` holding the run offsets,
  the swing and the numerical derivatives in shape and delay, ``sigma^2 = RSS / (N - p)``, inflated by
  ``(1 + rho) / (1 - rho)`` for the lag-1 autocorrelation ``rho > 0`` of the residuals (correlated residuals carry
  fewer independent readings than their count), times the t quantile with ``N - p`` degrees of freedom.
* Across runs (three runs or more): the delete-one-run jackknife, each refit searched from scratch,
  ``SE^2 = (R - 1) / R * sum (theta_(-r) - mean)^2``, times the t quantile with ``R - 1`` degrees of freedom
  (beyond 8 runs, the runs are dealt round-robin into 8 groups deleted one at a time, ``R`` the number of groups).
  It sees what the curvature cannot: parameters that move between runs (drift, throttling, model error).

Aliasing
--------
A continuous filter sees all of the time, yet the mean of readings sampled every ``Ts`` from a workload periodic at
``P`` is biased when the two clocks are phase-locked: if ``P / Ts = p / q`` in lowest terms, the readings visit only
``p`` equally spaced phases of the response, and their long-run mean is the mean over those phases, not over the
period. :func:`aliasing_periods_ms` checks every period of a 0.25 ms grid over 5 .. 200 ms for such a resonance
(``p <= 32``) within half a grid cell, reads the model's steady-state response to a 50 % square wave at the ``p``
phases from every starting phase, and reports the periods whose worst phase is off the true mean by more than 1 %
of the swing. A window reads that bias when it is long compared with ``P`` yet short compared with the beat period
between the workload and the sample clock: over a 10 s window, periods within ~``P * Ts / 10 s`` of the resonance
(0.04 ms at 20 ms). Regular stamps are the worst case: the jitter of real stamps (±5 ms on H100) smears the phases
and lowers the bias (a 20 ms square wave read +4 % of the mean power on H100; this model allows up to ±0.20 of the
104 W swing, ±5.9 % of the 363 W mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import WattscopeError
from ..response import KINDS, Response, Schedule, amplitude_ratio, phase_locked_bias
from ..sensor_profile import SourceCalibration

__all__ = [
    "DEFAULT_GRID",
    "CalibrationError",
    "ModelFit",
    "Run",
    "SearchGrid",
    "SourceFit",
    "StepMetrics",
    "aliasing_periods_ms",
    "distinct_readings",
    "fit_model",
    "fit_source",
    "measured_amplitude_ratio",
    "source_calibration",
    "square_wave_period_ns",
    "step_metrics",
]

_NS_PER_MS = 1e6


class CalibrationError(WattscopeError):
    """The calibration readings do not support a sensor model (or a step could not be measured)."""


@dataclass(frozen=True, eq=False)
class Run:
    """One recording of one power source under a commanded load.

    ``eq=False``: the fields are arrays, whose ``==`` is element-wise.

    Attributes:
        stamps_ns: reading stamps, strictly increasing int64, CLOCK_MONOTONIC ns.
        reading_w: power readings, W, one per stamp.
        busy_ns: commanded busy intervals, int64 array of shape (n, 2), ``[start_ns, end_ns)``.
        label: what was run, e.g. ``"step"``, ``"square 23 ms"``.
    """

    stamps_ns: np.ndarray
    reading_w: np.ndarray
    busy_ns: np.ndarray
    label: str


@dataclass(frozen=True)
class ModelFit:
    """The best parameters of one response model over a set of runs.

    Attributes:
        kind: ``"boxcar"`` or ``"lowpass"``.
        shape_ns: boxcar width or low-pass tau, ns.
        delay_ns: pure delay, ns.
        shape_ci_ns, delay_ci_ns: 95 % confidence half-widths, ns (inf when the data cannot bound them).
        low_w: idle power, W (reading-weighted mean of the runs' idle levels).
        high_w: busy power, W (``low_w`` + the shared swing).
        rms_residual_w: root-mean-square residual, W.
        rel_residual: ``rms_residual_w / (high_w - low_w)``; inf when the fit found no positive swing.
        n_readings: distinct readings used.
    """

    kind: str
    shape_ns: float
    delay_ns: float
    shape_ci_ns: float
    delay_ci_ns: float
    low_w: float
    high_w: float
    rms_residual_w: float
    rel_residual: float
    n_readings: int

    def response(self) -> Response:
        return Response(self.kind, self.shape_ns, self.delay_ns)


@dataclass(frozen=True)
class SourceFit:
    """The calibration of one power source.

    Attributes:
        source: ``"samples"``, ``"instant"``, ``"average"`` or ``"energy_counter"``.
        best: the model with the smaller relative residual.
        alternatives: the other model(s), for the report.
        sample_period_ns: median spacing of distinct readings, ns.
        coverage: share of time the readings account for: boxcar ``min(1, width / sample period)``, low-pass 1.
        aliasing_periods_ms: workload periods in [5, 200] ms whose mean of readings, phase-locked to the sample
            clock, is biased by more than 1 % of the swing (see the module docstring).
        amplitudes: ``(period_ms, measured peak-to-peak ratio, model ratio)`` per square-wave run.
    """

    source: str
    best: ModelFit
    alternatives: tuple[ModelFit, ...]
    sample_period_ns: float
    coverage: float
    aliasing_periods_ms: tuple[float, ...]
    amplitudes: tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class StepMetrics:
    """Model-free view of a step: 10-90 % rise time and the delay to the first reading that moved, ns."""

    rise_10_90_ns: float
    first_change_delay_ns: float


@dataclass(frozen=True)
class SearchGrid:
    """The coarse search grid and the zoom refinement (see the module docstring)."""

    shape_min_ns: float = 1e6
    shape_max_ns: float = 1.5e9
    n_shapes: int = 28
    delay_min_ns: float = -5e6
    delay_max_ns: float = 100e6
    delay_step_ns: float = 2.5e6
    zoom_levels: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.shape_min_ns < self.shape_max_ns or self.n_shapes < 2:
            raise ValueError("a search grid needs 0 < shape_min_ns < shape_max_ns and n_shapes >= 2")
        if not (self.delay_step_ns > 0 and self.delay_max_ns >= self.delay_min_ns) or self.zoom_levels < 0:
            raise ValueError("a search grid needs delay_step_ns > 0, delay_max_ns >= delay_min_ns, zoom_levels >= 0")

    def shapes_ns(self) -> np.ndarray:
        return np.geomspace(self.shape_min_ns, self.shape_max_ns, self.n_shapes)

    def delays_ns(self) -> np.ndarray:
        n = int(round((self.delay_max_ns - self.delay_min_ns) / self.delay_step_ns)) + 1
        return self.delay_min_ns + self.delay_step_ns * np.arange(n)

    def log_shape_step(self) -> float:
        return math.log(self.shape_max_ns / self.shape_min_ns) / max(1, self.n_shapes - 1)


DEFAULT_GRID = SearchGrid()


# -- data preparation -----------------------------------------------------------------------------------------------


def distinct_readings(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The run's stamps and readings with consecutive repeats of a value dropped (first appearance kept).

    A field polled faster than it updates repeats its last value under newer stamps; only the first appearance
    says when the value arrived. Raises ValueError for malformed runs.
    """
    stamps = np.asarray(run.stamps_ns)
    reading = np.asarray(run.reading_w, dtype=np.float64)
    if stamps.ndim != 1 or reading.shape != stamps.shape:
        raise ValueError(
            f"run {run.label!r}: stamps_ns and reading_w must be 1-D of one length, got {stamps.shape} and "
            f"{reading.shape}"
        )
    if stamps.size and stamps.dtype.kind not in "iu":
        raise ValueError(f"run {run.label!r}: stamps_ns must be integer nanoseconds, got dtype {stamps.dtype}")
    stamps = stamps.astype(np.int64)
    if not np.isfinite(reading).all():
        raise ValueError(f"run {run.label!r}: reading_w must be finite")
    if stamps.size > 1 and (np.diff(stamps) <= 0).any():
        raise ValueError(f"run {run.label!r}: stamps_ns must be strictly increasing")
    keep = np.concatenate(([True], reading[1:] != reading[:-1])) if reading.size else np.zeros(0, dtype=bool)
    return stamps[keep], reading[keep]


def square_wave_period_ns(busy_ns: np.ndarray) -> tuple[float, float] | None:
    """``(period_ns, duty)`` when the busy intervals form a regular square wave (at least 3 intervals whose start
    spacings agree within 5 %), else None."""
    busy = np.asarray(busy_ns, dtype=np.int64).reshape(-1, 2)
    if busy.shape[0] < 3:
        return None
    spacing = np.diff(busy[:, 0]).astype(np.float64)
    period = float(np.median(spacing))
    if period <= 0 or np.abs(spacing - period).max() > 0.05 * period:
        return None
    duty = float(np.median(busy[:, 1] - busy[:, 0])) / period
    if not 0.0 < duty < 1.0:
        return None
    return period, duty


class _Data:
    """Runs flattened for the fit: readings concatenated, times relative to each run's origin."""

    def __init__(self, runs: Sequence[Run]) -> None:
        if not runs:
            raise ValueError("need at least one run to fit")
        self.schedules: list[Schedule] = []
        self.times: list[np.ndarray] = []
        readings: list[np.ndarray] = []
        for run in runs:
            stamps, reading = distinct_readings(run)
            if stamps.size < 3:
                raise ValueError(f"run {run.label!r} has {stamps.size} distinct readings; at least 3 are needed")
            busy = np.asarray(run.busy_ns)
            origin = int(stamps[0])
            self.schedules.append(Schedule(busy, origin))
            self.times.append((stamps - origin).astype(np.float64))
            readings.append(reading)
        if all(s.n_intervals == 0 for s in self.schedules):
            raise ValueError("no run has a busy interval: the load schedule is empty")
        self.y = np.concatenate(readings)
        self.counts = np.array([r.size for r in readings])
        self.bounds = np.concatenate(([0], np.cumsum(self.counts)))
        self.y_sum = np.add.reduceat(self.y, self.bounds[:-1])
        self.syy = float(np.sum((self.y - np.repeat(self.y_sum / self.counts, self.counts)) ** 2))
        self.n = int(self.y.size)

    @property
    def n_runs(self) -> int:
        return len(self.schedules)

    def filtered(self, kind: str, shape_ns: float, delays_ns: np.ndarray) -> np.ndarray:
        """Filter output at every reading for each delay: shape (len(delays_ns), n)."""
        d = np.asarray(delays_ns, dtype=np.float64)[:, None]
        pieces = [s.filtered(kind, shape_ns, t[None, :] - d) for s, t in zip(self.schedules, self.times, strict=True)]
        return np.concatenate(pieces, axis=1)

    def levels(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closed-form levels for each row of ``f``: (rss, swing, run offsets (rows, runs))."""
        f_sum = np.add.reduceat(f, self.bounds[:-1], axis=1)
        sff = np.einsum("ij,ij->i", f, f) - np.sum(f_sum**2 / self.counts, axis=1)
        sfy = f @ self.y - np.sum(f_sum * self.y_sum / self.counts, axis=1)
        informative = sff > 1e-12 * self.n
        swing = np.where(informative, sfy / np.where(informative, sff, 1.0), 0.0)
        good = informative & (swing > 0)
        rss = np.where(good, self.syy - sfy * swing, self.syy)
        rss = np.maximum(rss, 0.0)
        swing = np.where(good, swing, 0.0)
        offsets = (self.y_sum - swing[:, None] * f_sum) / self.counts
        return rss, swing, offsets

    def subset(self, drop: set[int]) -> _Data:
        """The same data without the runs in ``drop`` (for the jackknife)."""
        other = object.__new__(_Data)
        keep = [i for i in range(self.n_runs) if i not in drop]
        other.schedules = [self.schedules[i] for i in keep]
        other.times = [self.times[i] for i in keep]
        pieces = [self.y[self.bounds[i] : self.bounds[i + 1]] for i in keep]
        other.y = np.concatenate(pieces)
        other.counts = self.counts[keep]
        other.bounds = np.concatenate(([0], np.cumsum(other.counts)))
        other.y_sum = self.y_sum[keep]
        other.syy = float(np.sum((other.y - np.repeat(other.y_sum / other.counts, other.counts)) ** 2))
        other.n = int(other.y.size)
        return other


# -- search ---------------------------------------------------------------------------------------------------------


def _grid_best(
    data: _Data, kind: str, shapes: np.ndarray, delays: np.ndarray, group_delay: bool = False
) -> tuple[float, float, float]:
    """(rss, shape_ns, delay_ns) of the best grid point. With ``group_delay`` the ``delays`` are group delays,
    converted to pure delays for each shape."""
    best = (math.inf, float(shapes[0]), float(delays[0]))
    for shape in shapes:
        pure = delays - _group_delay_per_shape(kind) * shape if group_delay else delays
        rss, _, _ = data.levels(data.filtered(kind, float(shape), pure))
        i = int(np.argmin(rss))
        if rss[i] < best[0]:
            best = (float(rss[i]), float(shape), float(pure[i]))
    return best


def _group_delay_per_shape(kind: str) -> float:
    return 0.5 if kind == "boxcar" else 1.0


def _search(data: _Data, kind: str, grid: SearchGrid) -> tuple[float, float, float]:
    """(rss, shape_ns, delay_ns) of the best point: coarse grid, then zoom."""
    rss, shape, delay = _grid_best(data, kind, grid.shapes_ns(), grid.delays_ns())
    # Zoom in (log shape, group delay): the group delay is what the readings pin down, so the valley of the residual
    # runs along the shape axis there, whereas in (shape, delay) it runs diagonally (a wider window with a shorter
    # delay reads alike) and a small box around the coarse optimum could not follow it.
    # A coarse shape step moves the group delay by up to c * shape * log step, so the first box spans that too.
    c = _group_delay_per_shape(kind)
    log_step = grid.log_shape_step()
    delay_step = grid.delay_step_ns + c * shape * log_step
    offsets = np.linspace(-1.0, 1.0, 9)
    for _ in range(grid.zoom_levels):
        shapes = shape * np.exp(log_step * offsets)
        group = delay + c * shape + delay_step * offsets
        z_rss, z_shape, z_delay = _grid_best(data, kind, shapes, group, group_delay=True)
        if z_rss <= rss:
            rss, shape, delay = z_rss, z_shape, z_delay
        log_step /= 4
        delay_step /= 4
    return rss, shape, delay


# -- confidence intervals -------------------------------------------------------------------------------------------

_JACKKNIFE_GROUPS = 8

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (numpy has no t distribution, scipy is not a
# dependency); beyond 30 the Cornish-Fisher expansion is accurate to 1e-4.
# fmt: off
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
# fmt: on


def t975(dof: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``dof`` degrees of freedom (inf for dof < 1)."""
    if dof < 1:
        return math.inf
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def _curvature_ci(data: _Data, kind: str, shape: float, delay: float) -> tuple[float, float]:
    f = data.filtered(kind, shape, np.array([delay]))
    rss, swing, offsets = data.levels(f)
    if swing[0] <= 0:
        return math.inf, math.inf
    h_shape = 1e-3 * shape
    h_delay = max(1e4, 1e-2 * shape)
    shape_rows = np.concatenate(
        [data.filtered(kind, shape + h, np.array([delay])) for h in (h_shape, -h_shape)], axis=0
    )
    delay_rows = data.filtered(kind, shape, np.array([delay + h_delay, delay - h_delay]))
    df_shape = (shape_rows[0] - shape_rows[1]) / (2 * h_shape)
    df_delay = (delay_rows[0] - delay_rows[1]) / (2 * h_delay)
    run_of = np.repeat(np.arange(data.n_runs), data.counts)
    indicator = (run_of[:, None] == np.arange(data.n_runs)[None, :]).astype(np.float64)
    jac = np.column_stack([indicator, f[0], swing[0] * df_shape, swing[0] * df_delay])
    n_params = jac.shape[1]
    dof = data.n - n_params
    if dof < 1:
        return math.inf, math.inf
    sigma2 = float(rss[0]) / dof
    residual = data.y - (offsets[0][run_of] + swing[0] * f[0])
    same_run = run_of[1:] == run_of[:-1]
    denom = float(residual @ residual)
    rho = float(np.sum((residual[1:] * residual[:-1])[same_run]) / denom) if denom > 0 else 0.0
    rho = min(max(rho, 0.0), 0.9)
    try:
        cov = np.linalg.inv(jac.T @ jac) * sigma2 * (1 + rho) / (1 - rho)
    except np.linalg.LinAlgError:
        return math.inf, math.inf
    var_shape, var_delay = cov[-2, -2], cov[-1, -1]
    t = t975(dof)
    return (
        t * math.sqrt(var_shape) if var_shape >= 0 else math.inf,
        t * math.sqrt(var_delay) if var_delay >= 0 else math.inf,
    )


def _jackknife_ci(data: _Data, kind: str, grid: SearchGrid) -> tuple[float, float]:
    # Delete-a-group: more than _JACKKNIFE_GROUPS runs are dealt round-robin into that many groups, which bounds
    # the refits (a calibration has ~20 runs) at little cost in precision.
    g = min(data.n_runs, _JACKKNIFE_GROUPS)
    groups = [set(range(i, data.n_runs, g)) for i in range(g)]
    estimates = np.array([_search(data.subset(drop), kind, grid)[1:] for drop in groups])
    spread = estimates - estimates.mean(axis=0)
    se = np.sqrt((g - 1) / g * np.sum(spread**2, axis=0))
    t = t975(g - 1)
    return float(t * se[0]), float(t * se[1])


# -- public fitting -------------------------------------------------------------------------------------------------


def fit_model(kind: str, runs: Sequence[Run], *, grid: SearchGrid = DEFAULT_GRID) -> ModelFit:
    """Fit one response model (``"boxcar"`` or ``"lowpass"``) to the runs; see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"unknown response kind {kind!r}: expected one of {KINDS}")
    data = _Data(runs)
    rss, shape, delay = _search(data, kind, grid)
    _, swing, offsets = data.levels(data.filtered(kind, shape, np.array([delay])))
    low = float(np.sum(offsets[0] * data.counts) / data.n)
    rms = math.sqrt(rss / data.n)
    rel = rms / float(swing[0]) if swing[0] > 0 else math.inf
    shape_ci, delay_ci = _curvature_ci(data, kind, shape, delay)
    if data.n_runs >= 3:
        jack_shape, jack_delay = _jackknife_ci(data, kind, grid)
        shape_ci, delay_ci = max(shape_ci, jack_shape), max(delay_ci, jack_delay)
    return ModelFit(
        kind=kind,
        shape_ns=shape,
        delay_ns=delay,
        shape_ci_ns=shape_ci,
        delay_ci_ns=delay_ci,
        low_w=low,
        high_w=low + float(swing[0]),
        rms_residual_w=rms,
        rel_residual=rel,
        n_readings=data.n,
    )


def fit_source(
    source: str, runs: Sequence[Run], *, max_rel_residual: float = 0.15, grid: SearchGrid = DEFAULT_GRID
) -> SourceFit:
    """Fit both models to one source's runs and keep the one with the smaller relative residual.

    Raises:
        CalibrationError: neither model fits within ``max_rel_residual`` (the message names both residuals).
    """
    fits = sorted((fit_model(kind, runs, grid=grid) for kind in KINDS), key=lambda m: m.rel_residual)
    best = fits[0]
    if not best.rel_residual <= max_rel_residual:
        residuals = ", ".join(f"{m.kind} {m.rel_residual:.1%}" for m in sorted(fits, key=lambda m: m.kind))
        raise CalibrationError(
            f"source {source!r}: neither sensor model fits the calibration readings (rms residual / power swing: "
            f"{residuals}; at most {max_rel_residual:.0%} expected). Another process may have used the GPU, or it "
            "throttled or changed clocks during calibration: check `nvidia-smi` for other processes, power and "
            "thermal limits, then run `wattscope calibrate` again on an idle GPU."
        )
    spacing = np.concatenate([np.diff(distinct_readings(run)[0]) for run in runs])
    sample_period = float(np.median(spacing))
    response = best.response()
    coverage = min(1.0, best.shape_ns / sample_period) if best.kind == "boxcar" else 1.0
    # A reading depends on the input over its delay plus the averaging (5 tau leave 0.7 % of a low-pass's memory).
    settle_ns = max(0.0, best.delay_ns) + (best.shape_ns if best.kind == "boxcar" else 5 * best.shape_ns)
    amplitudes = []
    for run in runs:
        square = square_wave_period_ns(run.busy_ns)
        if square is None:
            continue
        period, duty = square
        try:
            measured = measured_amplitude_ratio(run, best.low_w, best.high_w, settle_ns=settle_ns)
        except ValueError:
            continue  # too few steady readings: a source slow for this square wave has no amplitude to show
        amplitudes.append((period / _NS_PER_MS, measured, amplitude_ratio(response, period, duty)))
    return SourceFit(
        source=source,
        best=best,
        alternatives=tuple(fits[1:]),
        sample_period_ns=sample_period,
        coverage=coverage,
        aliasing_periods_ms=aliasing_periods_ms(response, sample_period),
        amplitudes=tuple(amplitudes),
    )


# -- model-free measurements ----------------------------------------------------------------------------------------


def measured_amplitude_ratio(run: Run, low_w: float, high_w: float, *, settle_ns: float | None = None) -> float:
    """Peak-to-peak of a square-wave run's readings in its steady part, divided by ``high_w - low_w``.

    The steady part is the readings stamped from ``settle_ns`` after the first busy start (default: a quarter of
    the busy span) to the last busy end. Readings are folded by their phase in the square wave (time since the
    latest commanded busy start, modulo the period) and smoothed by a circular running mean; as the response is
    continuous, neighbours in phase differ by noise alone, so the noise is estimated from them and the window is the
    fewest readings (at least 3, at most 1/15 of them) that average it down to 0.5 % of the swing. The ratio is the
    smoothed curve's max - min. Noise-free it is exact to ~0.01; with noise at 2 % of the swing and ~200 steady
    readings, within ~0.04 (the window rounds sharp peaks off, the noise left widens flat ones).

    Raises:
        ValueError: the run is not a square wave, ``high_w <= low_w``, or fewer than 6 readings are steady.
    """
    square = square_wave_period_ns(run.busy_ns)
    if square is None:
        raise ValueError(f"run {run.label!r} is not a regular square wave (need >= 3 evenly spaced busy intervals)")
    if not high_w > low_w:
        raise ValueError(f"high_w ({high_w}) must exceed low_w ({low_w})")
    period, _ = square
    stamps, reading = distinct_readings(run)
    busy = np.asarray(run.busy_ns, dtype=np.int64)
    first, last = int(busy[0, 0]), int(busy[-1, 1])
    settle = 0.25 * (last - first) if settle_ns is None else min(settle_ns, 0.75 * (last - first))
    steady = (stamps >= first + settle) & (stamps <= last)
    stamps, reading = stamps[steady], reading[steady]
    if stamps.size < 6:
        raise ValueError(f"run {run.label!r}: {stamps.size} readings in the steady part; at least 6 are needed")
    latest_start = busy[np.searchsorted(busy[:, 0], stamps, side="right") - 1, 0]
    phase = np.mod((stamps - latest_start).astype(np.float64), period)
    folded = reading[np.argsort(phase, kind="stable")]
    # The response is continuous, so neighbours in phase differ by noise: a robust noise estimate from them sets the
    # window to the fewest readings that average the noise to 0.5 % of the swing, capped at 1/15 of the readings.
    noise_w = float(np.median(np.abs(np.diff(folded)))) / (0.6745 * math.sqrt(2))
    wanted = math.ceil((noise_w / (0.005 * (high_w - low_w))) ** 2)
    k = min(max(3, wanted), max(3, folded.size // 15)) | 1  # odd, so the window is centred
    half = k // 2
    padded = np.concatenate((folded[-half:], folded, folded[:half]))
    csum = np.concatenate(([0.0], np.cumsum(padded)))
    smooth = (csum[k:] - csum[:-k]) / k
    return float((smooth.max() - smooth.min()) / (high_w - low_w))


def step_metrics(run: Run, low_w: float, high_w: float) -> StepMetrics:
    """Rise time and first-change delay of the first commanded rising edge of a run.

    ``first_change_delay_ns``: from the edge to the stamp of the first reading after it that rose by more than 10 %
    of ``high_w - low_w``. ``rise_10_90_ns``: between the 10 % and 90 % crossings, each placed by linear
    interpolation between the readings on either side of it.

    Raises:
        ValueError: ``high_w <= low_w`` or no busy interval.
        CalibrationError: the readings never rose by 10 % or 90 % after the edge.
    """
    if not high_w > low_w:
        raise ValueError(f"high_w ({high_w}) must exceed low_w ({low_w})")
    busy = np.asarray(run.busy_ns, dtype=np.int64).reshape(-1, 2)
    if busy.shape[0] == 0:
        raise ValueError(f"run {run.label!r} has no busy interval, so no step")
    edge = int(busy[:, 0].min())
    stamps, reading = distinct_readings(run)
    rise = (reading - low_w) / (high_w - low_w)
    after = int(np.searchsorted(stamps, edge, side="left"))

    def crossing(level: float, start: int) -> tuple[int, float]:
        above = np.flatnonzero(rise[start:] > level)
        if above.size == 0:
            raise CalibrationError(
                f"run {run.label!r}: the readings never rose by {level:.0%} of the step after the edge; the load did "
                "not reach the GPU or the source is too slow for this step: lengthen the step and run again"
            )
        i = start + int(above[0])
        if i == 0:
            return i, float(stamps[0])
        frac = (level - rise[i - 1]) / (rise[i] - rise[i - 1])
        return i, float(stamps[i - 1] + frac * (stamps[i] - stamps[i - 1]))

    i10, t10 = crossing(0.1, after)
    _, t90 = crossing(0.9, i10)
    return StepMetrics(rise_10_90_ns=max(0.0, t90 - t10), first_change_delay_ns=float(stamps[i10] - edge))


# -- aliasing -------------------------------------------------------------------------------------------------------


def aliasing_periods_ms(
    response: Response,
    sample_period_ns: float,
    *,
    threshold: float = 0.01,
    periods_ms: Sequence[float] | np.ndarray | None = None,
    cell_ms: float = 0.25,
    max_phases: int = 32,
) -> tuple[float, ...]:
    """Workload periods whose phase-locked mean of readings is biased by more than ``threshold`` of the swing.

    ``periods_ms`` defaults to 5 .. 200 ms in ``cell_ms`` steps. A period is flagged when a resonance with the
    sample clock, ``p * Ts / q`` with ``p <= max_phases`` phases visited, lies within half a cell of it and the
    model's response read at those ``p`` phases is biased beyond the threshold (see the module docstring).
    """
    if not sample_period_ns > 0:
        raise ValueError(f"sample_period_ns must be > 0, got {sample_period_ns!r}")
    grid = np.arange(5.0, 200.0 + 1e-9, cell_ms) if periods_ms is None else periods_ms
    periods = np.asarray(grid, dtype=np.float64)
    ts_ms = sample_period_ns / _NS_PER_MS
    flagged = []
    for period_ms in periods:
        for p in range(1, max_phases + 1):
            q = round(p * ts_ms / period_ms)
            if q < 1 or math.gcd(p, q) != 1:
                continue
            resonance_ms = p * ts_ms / q
            if abs(resonance_ms - period_ms) > cell_ms / 2:
                continue
            if phase_locked_bias(response, resonance_ms * _NS_PER_MS, p) > threshold:
                flagged.append(float(period_ms))
                break
    return tuple(flagged)


# -- profile data ---------------------------------------------------------------------------------------------------


def source_calibration(fit: SourceFit, step: StepMetrics | None) -> SourceCalibration:
    """The plain-data (JSON-able) form of a source's fit, with its step metrics when a step was measured."""
    best = fit.best
    return SourceCalibration(
        source=fit.source,
        model=best.kind,
        shape_ns=best.shape_ns,
        delay_ns=best.delay_ns,
        shape_ci_ns=best.shape_ci_ns,
        delay_ci_ns=best.delay_ci_ns,
        low_w=best.low_w,
        high_w=best.high_w,
        rel_residual=best.rel_residual,
        sample_period_ns=fit.sample_period_ns,
        coverage=fit.coverage,
        aliasing_periods_ms=fit.aliasing_periods_ms,
        amplitudes=fit.amplitudes,
        rise_10_90_ns=None if step is None else step.rise_10_90_ns,
        first_change_delay_ns=None if step is None else step.first_change_delay_ns,
    )
