"""The calibration run: drive a known load, record every power source at once, fit each, build the sensor profile.

A pass is a step (idle, busy, idle: levels, rise time, first-change delay) followed by 50 % square waves at periods
that are no multiple of the ~20 ms sample period (so every phase of the wave is sampled), in random order, each
starting at a random phase. The sampler records every source during the whole pass, so one pass serves all of
them. Two passes give repeated runs for the fit's across-run confidence intervals and its drift check.

Each segment of a pass is one launch of the load and one fitted run, which the fit models as following a long
idle. So a run keeps only the readings that depend on its segment alone: from the source's memory (delay plus
averaging) after the segment's start, up to the next segment's first busy edge. The memory comes from a first fit
on whole passes (every reading against every busy interval of the pass, right whatever the memory). A source that
remembers longer than half a square wave (the 1 s average field) is fitted on the whole passes instead: it cannot
show the waves' amplitudes anyway.

Readings enter as first appearances: a field polled faster than it updates repeats its value, and only the first
reading of a value says when it arrived. The energy counter is turned into a power series (energy difference over
time between the readings where it changed) and fitted like the other sources; its bias against the integrated
samples is reported on its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import energy
from ..measurement import GpuTrace
from ..response import KINDS
from ..sensor_profile import PROFILE_SCHEMA_VERSION, SensorProfile, SourceCalibration
from .fit import (
    CalibrationError,
    ModelFit,
    Run,
    SourceFit,
    StepMetrics,
    fit_model,
    fit_source,
    source_calibration,
    step_metrics,
)
from .load import Load, LoadRun

# Power sources in the order the report lists them (wattscope.meter.SOURCES).
SOURCES = ("samples", "instant", "average", "energy_counter")
# Sampler cadences during calibration. The energy counter every 43 ms: at 100 ms, polling and the counter's own ~100 ms
# updates kept one phase for a whole calibration and a new one at the next, so the counter's fitted delay moved 54 -> 12
# ms between two calibrations on the H100 (outside its CI); 43 ms shares no period with 100 ms and sweeps the phases, at
# ~9 % of a core for the minute of calibration (the call costs ~4 ms). The instant and average fields (~1-7 µs a call)
# every 4.7 ms: a field is stamped when it is read, so its first appearance lags the driver's update by up to one
# polling period. Polled this fast, the fitted delay is the sensor's own plus 2.35 ms on average; and since 4.7 ms
# divides neither the fields' ~100 ms update period nor 20 ms, that lag sweeps all its values instead of sitting at one
# phase that changes with every sampler start (at 5 ms, two calibrations in a row differed by 1 ms in the instant
# field's delay, 2 CIs apart). Measurements poll the fields more slowly and see them up to one of their own polling
# periods later.
CALIBRATION_SAMPLER = {"energy_period_ns": 43_000_000, "instant_period_ns": 4_700_000, "average_period_ns": 4_700_000}
_NOMINAL_SAMPLE_PERIOD_MS = 20.0
# Lead time from planning a pass to its first segment's start: the load's clock alignment and launch fit well inside.
_PLAN_LEAD_NS = 30_000_000


@dataclass(frozen=True)
class CalibrationPlan:
    """The load schedule of one pass, and how many passes.

    ``periods_ms`` should avoid multiples of the ~20 ms sample period; at least 6 of them between 10 and 100 ms
    support the amplitude check of the validation.
    """

    step_idle_before_s: float = 0.8
    step_busy_s: float = 1.2
    step_idle_after_s: float = 1.2
    periods_ms: tuple[float, ...] = (11.0, 13.0, 17.0, 23.0, 29.0, 37.0, 47.0, 61.0, 83.0, 97.0)
    square_s: float = 1.5  # duration of each square wave
    gap_s: float = 0.25  # idle before each square wave
    duty: float = 0.5
    passes: int = 2

    def __post_init__(self) -> None:
        if min(self.step_idle_before_s, self.step_busy_s, self.step_idle_after_s, self.square_s, self.gap_s) <= 0:
            raise ValueError("every duration of a calibration plan must be positive")
        if not self.periods_ms or min(self.periods_ms) <= 0:
            raise ValueError("a calibration plan needs positive square-wave periods")
        if any(self.square_s * 1e3 < 3 * p for p in self.periods_ms):
            raise ValueError("each square wave must last at least 3 periods")
        if not 0.0 < self.duty < 1.0:
            raise ValueError(f"duty must be strictly between 0 and 1, got {self.duty}")
        if self.passes < 1:
            raise ValueError("a calibration needs at least one pass")

    @property
    def pass_s(self) -> float:
        """Approximate duration of one pass, s."""
        squares = sum(self.gap_s + math.ceil(self.square_s * 1e3 / p) * p / 1e3 for p in self.periods_ms)
        return self.step_idle_before_s + self.step_busy_s + self.step_idle_after_s + squares


DEFAULT_PLAN = CalibrationPlan()
# For tests and `wattscope calibrate --quick`: one pass of ~3 s instead of two of ~21 s; too short for the slow
# sources (the 1 s average, the energy counter), coarse for the others.
QUICK_PLAN = CalibrationPlan(step_idle_before_s=0.3, step_busy_s=0.4, step_idle_after_s=0.4,
                             periods_ms=(13.0, 37.0, 61.0), square_s=0.5, gap_s=0.15, passes=1)


@dataclass(frozen=True)
class Segment:
    """One launch of the load: its busy intervals and its span, CLOCK_MONOTONIC ns."""

    label: str
    period_ms: float | None  # None for the step
    start_ns: int
    end_ns: int
    busy_ns: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class PassRecord:
    """What one pass ran and what every source read meanwhile."""

    segments: tuple[Segment, ...]
    load_runs: tuple[LoadRun, ...]
    trace: GpuTrace
    start_ns: int
    stop_ns: int


@dataclass(frozen=True)
class CalibrationReport:
    """Result of :func:`calibrate`.

    Attributes:
        profile: the sensor profile (saved at ``profile_path`` unless saving was turned off).
        fits: per calibrated source, its fit (both models, amplitudes, aliasing).
        steps: per calibrated source, the model-free step view (mean over the passes).
        runs: per calibrated source, the runs that were fitted (for plots).
        skipped: per source that was not calibrated, why.
        counter_bias_rel: ``(counter delta - integrated samples) / integrated samples`` over each pass; None when
            either is missing.
        alignment_uncertainty_ns: the largest host-to-GPU clock alignment uncertainty of any segment.
        load: what drew the power.
        wall_s: the whole calibration, s, fitting included.
        passes: the raw recordings.
        profile_path: where the profile was saved, None when not saved.
    """

    profile: SensorProfile
    fits: dict[str, SourceFit]
    steps: dict[str, StepMetrics]
    runs: dict[str, tuple[Run, ...]] = field(repr=False)
    skipped: dict[str, str]
    counter_bias_rel: tuple[float, ...] | None
    alignment_uncertainty_ns: int
    load: str
    wall_s: float
    passes: tuple[PassRecord, ...] = field(repr=False)
    profile_path: str | None = None


Progress = Callable[[str], None]


def calibrate(
    cuda_index: int = 0,
    *,
    load: Load | None = None,
    plan: CalibrationPlan = DEFAULT_PLAN,
    progress: Progress | None = None,
    seed: int | None = None,
    save: bool = True,
    directory: str | Path | None = None,
) -> CalibrationReport:
    """Calibrate the power sensor of CUDA device ``cuda_index`` (see the module docstring).

    load: what draws the power; default a :class:`~wattscope.calibration.load.GpuLoad` on ``cuda_index`` (closed
        afterwards). A load passed in stays open.
    plan: the schedule (:data:`DEFAULT_PLAN`: two passes of ~21 s).
    progress: called with a line of text at each stage.
    seed: seeds the random phases and period order (None: fresh randomness).
    save: write the profile with :func:`wattscope.sensor_profile.save_profile` into ``directory`` (default the
        cache folder) and make this process's meters use it.

    Raises:
        CalibrationError: no source could be calibrated (each source's reason is in the message).
        LoadError: the load could not run.
    """
    import wattscope

    from .. import sensor
    from ..sensor_profile import save_profile

    say = progress or (lambda _msg: None)
    wall_start = time.monotonic()
    own_load = load is None
    if load is None:
        from .load import GpuLoad

        load = GpuLoad(cuda_index)
    rng = np.random.default_rng(seed)
    try:
        say(f"load: {load.description}")
        wattscope.configure_sampler(**CALIBRATION_SAMPLER)
        try:
            passes = []
            for i in range(plan.passes):
                say(f"pass {i + 1}/{plan.passes}: step and {len(plan.periods_ms)} square waves (~{plan.pass_s:.0f} s)")
                passes.append(_run_pass(load, plan, rng, cuda_index))
        finally:
            wattscope.configure_sampler()
    finally:
        if own_load:
            load.close()
    trace = passes[0].trace
    say("fitting")
    fits, steps, runs, skipped = _fit_all(passes, plan, say)
    if not fits:
        raise CalibrationError("no power source could be calibrated: "
                               + "; ".join(f"{s}: {why}" for s, why in skipped.items()))
    biases = tuple(b for b in (_counter_bias(p) for p in passes) if b is not None)
    calibration_s = sum((p.stop_ns - p.start_ns) / 1e9 for p in passes)
    profile = SensorProfile(
        schema_version=PROFILE_SCHEMA_VERSION,
        gpu_name=trace.name,
        gpu_uuid=trace.uuid,
        driver_version=trace.driver_version,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wattscope_version=wattscope.__version__,
        calibration_s=calibration_s,
        sources={s: _sensor_own(source_calibration(f, steps.get(s))) for s, f in fits.items()},
        best_source=best_source(fits),
        counter_bias_rel=float(np.mean(biases)) if biases else None,
    )
    path = None
    if save:
        path = str(save_profile(profile, None if directory is None else Path(directory)))
        sensor.forget_profiles()
        say(f"profile saved: {path}")
    return CalibrationReport(
        profile=profile, fits=fits, steps=steps, runs=runs, skipped=skipped,
        counter_bias_rel=biases or None,
        alignment_uncertainty_ns=max(r.alignment_uncertainty_ns for p in passes for r in p.load_runs),
        load=load.description, wall_s=time.monotonic() - wall_start, passes=tuple(passes), profile_path=path,
    )


def best_source(fits: dict[str, SourceFit]) -> str:
    """The source measurements should use: among those that see (nearly) all of the time, the one with the
    shortest memory (delay + averaging), i.e. the finest time resolution; sources with gaps in their view come
    last. Ties go to the order of :data:`SOURCES`."""

    def key(source: str) -> tuple[bool, float, int]:
        return (fits[source].coverage < 0.95, _memory_ns(fits[source].best), SOURCES.index(source))

    return min(fits, key=key)


# -- the passes -----------------------------------------------------------------------------------------------------


def plan_pass(plan: CalibrationPlan, rng: np.random.Generator, start_ns: int) -> tuple[Segment, ...]:
    """Lay one pass out from ``start_ns``: the step, then the square waves in random order at random phases."""
    segments = []
    t = start_ns
    busy_start = t + _ns(plan.step_idle_before_s)
    busy_end = busy_start + _ns(plan.step_busy_s)
    end = busy_end + _ns(plan.step_idle_after_s)
    segments.append(Segment("step", None, t, end, np.array([[busy_start, busy_end]], dtype=np.int64)))
    t = end
    for period_ms in rng.permutation(np.asarray(plan.periods_ms, dtype=np.float64)):
        period_ns = period_ms * 1e6
        n = math.ceil(plan.square_s * 1e3 / period_ms)
        # Random phase against the sensor's own sample clock.
        first = t + _ns(plan.gap_s) + int(rng.uniform(0.0, 2 * _NOMINAL_SAMPLE_PERIOD_MS * 1e6))
        starts = first + np.round(np.arange(n) * period_ns).astype(np.int64)
        busy = np.stack([starts, starts + int(round(plan.duty * period_ns))], axis=1)
        end = int(first + round(n * period_ns))
        segments.append(Segment(f"square {period_ms:g} ms", float(period_ms), t, end, busy))
        t = end
    return tuple(segments)


def _run_pass(load: Load, plan: CalibrationPlan, rng: np.random.Generator, cuda_index: int) -> PassRecord:
    from ..meter import PowerMeter

    meter = PowerMeter(load.uuid if load.uuid else cuda_index, sync_cuda=False, wait_timeout_s=3.0)
    meter.start()
    start_ns = time.monotonic_ns()
    try:
        segments = plan_pass(plan, rng, start_ns + _PLAN_LEAD_NS)
        load_runs = tuple(load.run(seg.busy_ns, seg.end_ns) for seg in segments)
    finally:
        stop_ns = time.monotonic_ns()
        meter.stop()
    (trace,) = meter.traces
    return PassRecord(segments, load_runs, trace, start_ns, stop_ns)


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


# -- fitting --------------------------------------------------------------------------------------------------------


def power_series(trace: GpuTrace, source: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A source's readings as ``(t_ns, power_w)``, each value at its first appearance; the energy counter as its
    power between the readings where it changed. None when the GPU does not offer the source.

    A source polled faster than it updates repeats its last value under newer stamps; only the first appearance
    says when the value arrived (the fit drops repeats too). Dropping them before a run is cut out of the series
    keeps a stale repeat from passing for a fresh reading at the run's start."""
    if source not in trace.series:
        return None
    t_ns, value = trace.series[source]
    t_ns = np.asarray(t_ns, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    first = np.concatenate(([True], value[1:] != value[:-1])) if value.size else np.zeros(0, dtype=bool)
    t_ns, value = t_ns[first], value[first]
    if source != "energy_counter":
        return t_ns, value
    if t_ns.size < 2:
        return t_ns[:0], value[:0]
    # Power is the energy between two updates over the time between them.
    return t_ns[1:], np.diff(value) / (np.diff(t_ns) / 1e9)


def _pass_runs(passes: Sequence[PassRecord], source: str) -> list[Run]:
    """One run per pass: every reading of the pass against every busy interval of it (exact whatever the source's
    memory, but no square wave of its own to measure an amplitude on)."""
    runs = []
    for i, p in enumerate(passes):
        series = power_series(p.trace, source)
        if series is None:
            continue
        t_ns, power_w = series
        keep = (t_ns >= p.start_ns) & (t_ns <= p.stop_ns)
        busy = np.concatenate([seg.busy_ns for seg in p.segments])
        runs.append(Run(t_ns[keep], power_w[keep], busy, f"pass {i + 1}"))
    return runs


def _segment_runs(passes: Sequence[PassRecord], source: str, memory_ns: float) -> list[Run]:
    """One run per segment, with the readings that depend on that segment's busy intervals alone: from the
    source's memory after the segment's start (the previous segment's last edge) to the next segment's first busy
    edge. Nothing of the load precedes the first segment of the first pass."""
    runs = []
    for i, p in enumerate(passes):
        series = power_series(p.trace, source)
        if series is None:
            continue
        t_ns, power_w = series
        for k, seg in enumerate(p.segments):
            lo = seg.start_ns + (memory_ns if i or k else 0.0)
            hi = p.segments[k + 1].busy_ns[0, 0] if k + 1 < len(p.segments) else p.stop_ns
            keep = (t_ns >= lo) & (t_ns < hi)
            runs.append(Run(t_ns[keep], power_w[keep], seg.busy_ns, seg.label))
    return runs


def _usable(runs: list[Run], minimum: int = 3) -> list[Run]:
    """Runs with enough distinct readings to fit (a slow source may have none left in a short segment)."""
    out = []
    for run in runs:
        r = run.reading_w
        distinct = 1 + int(np.count_nonzero(r[1:] != r[:-1])) if r.size else 0
        if distinct >= minimum:
            out.append(run)
    return out


def _memory_ns(fit: ModelFit) -> float:
    """How long after the input a reading still depends on it: delay plus the averaging (5 tau: 0.7 % left)."""
    return max(0.0, fit.delay_ns) + (fit.shape_ns if fit.kind == "boxcar" else 5 * fit.shape_ns)


def _fit_all(passes: Sequence[PassRecord], plan: CalibrationPlan, say: Progress,
             ) -> tuple[dict[str, SourceFit], dict[str, StepMetrics], dict[str, tuple[Run, ...]], dict[str, str]]:
    fits: dict[str, SourceFit] = {}
    steps: dict[str, StepMetrics] = {}
    runs_of: dict[str, tuple[Run, ...]] = {}
    skipped: dict[str, str] = {}
    for source in SOURCES:
        if source not in passes[0].trace.series:
            skipped[source] = "not offered by this GPU or driver"
            continue
        try:
            whole = _usable(_pass_runs(passes, source))
            if not whole:
                raise CalibrationError("too few distinct readings")
            # A first fit on whole passes tells how long the source remembers, hence which readings of each
            # segment depend on that segment alone. A source that remembers longer than half a square wave cannot
            # show the waves' amplitudes: it is fitted on the whole passes.
            first = min((fit_model(kind, whole) for kind in KINDS), key=lambda m: m.rel_residual)
            memory_ns = _memory_ns(first)
            fast = memory_ns < _ns(plan.square_s) / 2
            runs = _usable(_segment_runs(passes, source, memory_ns)) if fast else whole
            fit = fit_source(source, runs)
        except (CalibrationError, ValueError) as e:
            skipped[source] = str(e)
            say(f"{source}: not calibrated ({e})")
            continue
        fits[source] = fit
        runs_of[source] = tuple(runs)
        metrics = []
        for run in runs:
            # Each step segment, or each whole pass (whose first edge is its step's).
            if run.label == "step" or run.label.startswith("pass "):
                try:
                    metrics.append(step_metrics(run, fit.best.low_w, fit.best.high_w))
                except CalibrationError as e:
                    say(f"{source}: step not measured ({e})")
        if metrics:
            steps[source] = StepMetrics(float(np.mean([m.rise_10_90_ns for m in metrics])),
                                        float(np.mean([m.first_change_delay_ns for m in metrics])))
        say(f"{source}: {fit.best.response().describe()}, residual {fit.best.rel_residual:.1%} of the swing")
    return fits, steps, runs_of, skipped


def _sensor_own(cal: SourceCalibration) -> SourceCalibration:
    """The profile keeps the sensor's own delay: a polled field is stamped when read, on average half a polling period
    after it changed, and measurements poll at their own cadence (the meter adds that half period back)."""
    poll_ns = {"instant": CALIBRATION_SAMPLER["instant_period_ns"],
               "average": CALIBRATION_SAMPLER["average_period_ns"]}.get(cal.source)
    return cal if poll_ns is None else replace(cal, delay_ns=cal.delay_ns - poll_ns / 2)


def _counter_bias(p: PassRecord) -> float | None:
    """``(counter delta - integrated samples) / integrated samples`` between the first and last counter updates of
    the pass.

    The counter updates on its own grid (~100 ms) and is stamped when polled: an update happened between the last
    reading that still showed the old value and the first that shows the new one. The midpoint of those two stamps
    is the update time's estimate, off by at most half a polling period either way (without it every edge would
    lag by up to a whole period, one-sided)."""
    if "energy_counter" not in p.trace.series or "samples" not in p.trace.series:
        return None
    t_e, e_j = (np.asarray(a) for a in p.trace.series["energy_counter"])
    if t_e.size < 2:
        return None
    changed = np.flatnonzero(e_j[1:] != e_j[:-1]) + 1
    updated_ns = (t_e[changed - 1] + t_e[changed]) // 2
    inside = (updated_ns >= p.start_ns) & (updated_ns <= p.stop_ns)
    t_c, e_c = updated_ns[inside], e_j[changed][inside]
    if t_c.size < 2:
        return None
    t_s, w_s = p.trace.series["samples"]
    try:
        integrated = energy.integrate_window(np.asarray(t_s, dtype=np.int64), w_s, int(t_c[0]), int(t_c[-1]))
    except ValueError:
        return None
    if not integrated.energy_j > 0:
        return None
    return float((e_c[-1] - e_c[0] - integrated.energy_j) / integrated.energy_j)
