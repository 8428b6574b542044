"""Calibration fitting on synthetic recordings: parameter recovery for each model, rejection of traces that fit
neither, honest confidence intervals, model-free step and amplitude measurements, aliasing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wattscope.calibration.fit import (
    CalibrationError,
    Run,
    SearchGrid,
    aliasing_periods_ms,
    distinct_readings,
    fit_model,
    fit_source,
    measured_amplitude_ratio,
    source_calibration,
    square_wave_period_ns,
    step_metrics,
    t975,
)
from wattscope.errors import WattscopeError
from wattscope.response import Response, amplitude_ratio, predicted_reading_w

MS = 1_000_000
T0 = 3 * 10**14
LOW_W, HIGH_W = 311.0, 415.0  # the H100 square-wave levels of measurement-facts §2
SWING_W = HIGH_W - LOW_W
H100 = Response("lowpass", 11.5 * MS, 3 * MS)
BOXCAR = Response("boxcar", 25 * MS, 5 * MS)
SMALL_GRID = SearchGrid(shape_min_ns=2e6, shape_max_ns=200e6, n_shapes=14, delay_max_ns=30e6)


def jittered_stamps(
    rng: np.random.Generator, t0: int, duration_ns: int, period_ns: int = 20 * MS, jitter_ns: int = 5 * MS
) -> np.ndarray:
    """Stamps like the H100 sample stream: every 20 ms +- 5 ms."""
    n = duration_ns // (period_ns - jitter_ns) + 2
    stamps = t0 + np.cumsum(rng.uniform(period_ns - jitter_ns, period_ns + jitter_ns, n)).astype(np.int64)
    return stamps[stamps < t0 + duration_ns]


def square(t0: int, period_ns: int, duration_ns: int, duty: float = 0.5) -> np.ndarray:
    starts = t0 + np.arange(0, duration_ns, period_ns, dtype=np.int64)
    return np.stack([starts, starts + int(duty * period_ns)], axis=1)


def recordings(
    rng: np.random.Generator,
    response: Response,
    *,
    periods_ms=(23, 37, 13, 57),
    square_ms: int = 2000,
    step: bool = True,
    noise: float = 0.02,
    drift_w: float = 0.0,
) -> list[Run]:
    """A step (1 s idle, 2 s busy, 1 s idle) and 50 % square waves at periods that are not multiples of 20 ms, read
    through ``response`` at jittered stamps with Gaussian noise of ``noise`` times the swing. ``drift_w`` shifts each
    successive run's idle level (the GPU warming up)."""
    runs = []
    t = T0
    schedules = []
    if step:
        schedules.append((np.array([[t + 1000 * MS, t + 3000 * MS]]), 4000 * MS, "step"))
        t += 5000 * MS
    for period in periods_ms:
        schedules.append(
            (square(t + 300 * MS, period * MS, square_ms * MS), (square_ms + 600) * MS, f"square {period} ms")
        )
        t += (square_ms + 1600) * MS
    for i, (busy, duration, label) in enumerate(schedules):
        stamps = jittered_stamps(rng, int(busy[0, 0]) - 300 * MS, duration)
        low = LOW_W + i * drift_w
        reading = predicted_reading_w(busy, stamps, response, low, low + SWING_W)
        reading = reading + rng.normal(0.0, noise * SWING_W, stamps.size)
        runs.append(Run(stamps, reading, busy, label))
    return runs


# -- recovery -------------------------------------------------------------------------------------------------------


def test_lowpass_sensor_is_recovered() -> None:
    runs = recordings(np.random.default_rng(1), H100, drift_w=1.5)
    fit = fit_source("samples", runs)
    best = fit.best
    assert best.kind == "lowpass"
    assert [m.kind for m in fit.alternatives] == ["boxcar"]
    assert fit.alternatives[0].rel_residual > 2 * best.rel_residual
    assert best.shape_ns == pytest.approx(11.5 * MS, rel=0.05)
    assert best.delay_ns == pytest.approx(3 * MS, abs=0.3 * MS)
    # The intervals cover the truth and are informative (a few % of tau, a fraction of a ms).
    assert abs(best.shape_ns - 11.5 * MS) <= best.shape_ci_ns < 0.1 * 11.5 * MS
    assert abs(best.delay_ns - 3 * MS) <= best.delay_ci_ns < 0.5 * MS
    assert best.rel_residual == pytest.approx(0.02, rel=0.2)  # the noise, nothing more
    assert best.high_w - best.low_w == pytest.approx(SWING_W, rel=0.01)
    assert best.low_w == pytest.approx(LOW_W + 1.5 * 2, abs=1.0)  # reading-weighted mean of the drifting levels
    assert best.n_readings == sum(r.stamps_ns.size for r in runs)
    assert fit.sample_period_ns == pytest.approx(20 * MS, rel=0.03)
    assert fit.coverage == 1.0
    assert [a[0] for a in fit.amplitudes] == [23.0, 37.0, 13.0, 57.0]
    for period_ms, measured, model in fit.amplitudes:
        assert model == pytest.approx(math.tanh(period_ms / (4 * best.shape_ns / MS)), rel=1e-9)
        assert measured == pytest.approx(math.tanh(period_ms / 46), abs=0.07)
    assert 20.0 in fit.aliasing_periods_ms and 23.0 not in fit.aliasing_periods_ms


def test_boxcar_sensor_is_recovered() -> None:
    fit = fit_source("samples", recordings(np.random.default_rng(2), BOXCAR))
    best = fit.best
    assert best.kind == "boxcar"
    assert best.shape_ns == pytest.approx(25 * MS, rel=0.03)
    assert best.delay_ns == pytest.approx(5 * MS, abs=0.5 * MS)
    assert abs(best.shape_ns - 25 * MS) <= best.shape_ci_ns
    assert abs(best.delay_ns - 5 * MS) <= best.delay_ci_ns
    assert best.rel_residual < 0.03
    assert fit.coverage == 1.0  # a 25 ms window read every 20 ms sees all of the time
    for period_ms, _, model in fit.amplitudes:
        assert model == pytest.approx(amplitude_ratio(BOXCAR, period_ms * MS), abs=0.02)


def test_held_field_polled_faster_than_it_updates() -> None:
    """An instant-like field: a 25 ms boxcar updated every 100 ms, polled every 50 ms (each value read twice)."""
    rng = np.random.default_rng(3)
    runs = []
    for run in recordings(rng, BOXCAR, periods_ms=(37, 57, 250), square_ms=3000, noise=0.0):
        t0, t1 = int(run.stamps_ns[0]), int(run.stamps_ns[-1])
        updates = np.arange(t0, t1, 100 * MS) + int(rng.integers(0, 100 * MS))
        value = predicted_reading_w(run.busy_ns, updates, BOXCAR, LOW_W, HIGH_W) + rng.normal(0, 2.0, updates.size)
        polls = np.arange(int(updates[0]) + 1000, t1, 50 * MS)
        held = value[np.searchsorted(updates, polls, side="right") - 1]
        runs.append(Run(polls, held, run.busy_ns, run.label))
    fit = fit_source("instant", runs)
    assert fit.best.kind == "boxcar"
    assert fit.best.shape_ns == pytest.approx(25 * MS, rel=0.1)
    assert fit.best.delay_ns == pytest.approx(5 * MS, abs=2 * MS)
    assert fit.sample_period_ns == pytest.approx(100 * MS, rel=0.01)
    assert fit.coverage == pytest.approx(0.25, rel=0.1)
    assert fit.best.n_readings == pytest.approx(sum(r.stamps_ns.size for r in runs) / 2, rel=0.02)
    # Phase-locked: a 100 ms workload read every 100 ms.
    assert 100.0 in fit.aliasing_periods_ms


def test_slow_average_is_recovered_along_its_valley() -> None:
    """A 1 s moving average: width and delay trade off (same group delay); the search must follow the valley."""
    response = Response("boxcar", 1000 * MS, 0.0)
    runs = recordings(np.random.default_rng(4), response, periods_ms=(100, 250), square_ms=3000, noise=0.01)
    fit = fit_model("boxcar", runs)
    assert fit.shape_ns == pytest.approx(1000 * MS, rel=0.03)
    assert abs(fit.delay_ns) < 20 * MS
    assert abs(fit.shape_ns - 1000 * MS) <= fit.shape_ci_ns


def test_source_too_slow_for_a_square_wave_has_no_amplitude_for_it() -> None:
    response = Response("boxcar", 1000 * MS, 0.0)
    runs = recordings(np.random.default_rng(10), response, periods_ms=(100, 37), square_ms=1200, noise=0.01)
    runs[2] = Run(runs[2].stamps_ns[::10], runs[2].reading_w[::10], runs[2].busy_ns, runs[2].label)  # sparse
    fit = fit_source("average", runs, grid=SearchGrid(n_shapes=14, delay_max_ns=30e6))
    assert fit.best.kind == "boxcar" and fit.best.shape_ns == pytest.approx(1000 * MS, rel=0.1)
    assert [a[0] for a in fit.amplitudes] == [100.0]  # the sparse 37 ms run has too few steady readings


@pytest.mark.parametrize("kind", ["walk", "sine"])
def test_traces_that_fit_neither_model_are_rejected(kind: str) -> None:
    rng = np.random.default_rng(5)
    runs = recordings(rng, H100, periods_ms=(23, 37), square_ms=1500)
    if kind == "walk":
        fake = [Run(r.stamps_ns, 350 + np.cumsum(rng.normal(0, 3, r.stamps_ns.size)), r.busy_ns, r.label) for r in runs]
    else:  # a sine that has nothing to do with the schedule
        fake = [
            Run(r.stamps_ns, 360 + 50 * np.sin(2 * np.pi * 3.7 * r.stamps_ns / 1e9), r.busy_ns, r.label) for r in runs
        ]
    with pytest.raises(CalibrationError) as info:
        fit_source("samples", fake, grid=SMALL_GRID)
    message = str(info.value)
    assert "source 'samples': neither sensor model fits" in message
    assert "boxcar" in message and "lowpass" in message and "at most 15% expected" in message
    assert "run `wattscope calibrate` again" in message
    assert isinstance(info.value, WattscopeError)
    # The same readings with the real response are accepted.
    assert fit_source("samples", runs, grid=SMALL_GRID).best.kind == "lowpass"


def test_confidence_intervals_cover_the_truth_across_seeds() -> None:
    """Over 20 independent recordings, the 95 % intervals cover the true shape and delay in most of them."""
    for truth in (H100, BOXCAR):
        covered = np.zeros(2)
        widths = []
        for seed in range(20):
            runs = recordings(np.random.default_rng(100 + seed), truth, periods_ms=(23, 37, 13), square_ms=1500)
            fit = fit_model(truth.kind, runs, grid=SMALL_GRID)
            covered += [
                abs(fit.shape_ns - truth.shape_ns) <= fit.shape_ci_ns,
                abs(fit.delay_ns - truth.delay_ns) <= fit.delay_ci_ns,
            ]
            widths.append((fit.shape_ci_ns / truth.shape_ns, fit.delay_ci_ns))
        assert (covered >= 17).all(), (truth, covered)
        # Honest is not the same as useless: the typical interval is tight.
        median_shape_rel, median_delay_ns = np.median(widths, axis=0)
        assert median_shape_rel < 0.1 and median_delay_ns < 1 * MS


# -- model-free measurements ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("response", [H100, BOXCAR, Response("boxcar", 10 * MS, 2 * MS)], ids=lambda r: r.describe())
def test_measured_amplitude_matches_the_model(response: Response) -> None:
    rng = np.random.default_rng(6)
    for noise, tolerance in ((0.0, 0.015), (0.02, 0.06)):
        for run in recordings(rng, response, periods_ms=(13, 23, 37, 100), square_ms=4000, step=False, noise=noise):
            period_ns, duty = square_wave_period_ns(run.busy_ns)
            measured = measured_amplitude_ratio(run, LOW_W, HIGH_W)
            assert measured == pytest.approx(amplitude_ratio(response, period_ns, duty), abs=tolerance), run.label


def test_measured_amplitude_needs_a_square_wave() -> None:
    step = recordings(np.random.default_rng(7), H100, periods_ms=())[0]
    with pytest.raises(ValueError, match="not a regular square wave"):
        measured_amplitude_ratio(step, LOW_W, HIGH_W)


def test_step_metrics_of_a_lowpass_and_a_boxcar() -> None:
    busy = np.array([[T0, T0 + 500 * MS]])
    stamps = T0 + np.arange(-50 * MS, 600 * MS, 100_000, dtype=np.int64)  # dense: the metrics are the model's
    for response, rise in ((H100, 11.5 * MS * math.log(9)), (BOXCAR, 0.8 * 25 * MS)):
        reading = predicted_reading_w(busy, stamps, response, LOW_W, HIGH_W)
        metrics = step_metrics(Run(stamps, reading, busy, "step"), LOW_W, HIGH_W)
        assert metrics.rise_10_90_ns == pytest.approx(rise, abs=0.2 * MS)
        # First reading above 10 %: after the delay, plus the time the filter takes to rise 10 %.
        first = response.delay_ns + (-11.5 * MS * math.log(0.9) if response.kind == "lowpass" else 2.5 * MS)
        assert metrics.first_change_delay_ns == pytest.approx(first, abs=0.2 * MS)


def test_step_metrics_on_jittered_readings_are_close() -> None:
    run = recordings(np.random.default_rng(8), H100, periods_ms=(), noise=0.005)[0]
    metrics = step_metrics(run, LOW_W, HIGH_W)
    # 20 ms sampling: within a sample period of the continuous values (25.3 ms rise, 4.2 ms to 10 %).
    assert metrics.rise_10_90_ns == pytest.approx(25.3 * MS, abs=20 * MS)
    assert 4.2 * MS <= metrics.first_change_delay_ns <= 4.2 * MS + 25 * MS


def test_step_that_never_rises_is_an_error() -> None:
    busy = np.array([[T0, T0 + 500 * MS]])
    stamps = T0 + np.arange(-50 * MS, 600 * MS, 20 * MS, dtype=np.int64)
    flat = Run(stamps, np.full(stamps.size, LOW_W) + np.arange(stamps.size) * 1e-3, busy, "step")
    with pytest.raises(CalibrationError, match="never rose by 10%"):
        step_metrics(flat, LOW_W, HIGH_W)


# -- aliasing -------------------------------------------------------------------------------------------------------


def test_aliasing_flags_phase_locked_periods_only() -> None:
    periods = np.array([20.0, 23.0, 37.0, 40.0])
    # Every reading of a 20 ms wave lands on one phase; a 40 ms wave alternates between opposite phases, whose
    # mean is exact for a symmetric square wave.
    assert aliasing_periods_ms(H100, 20 * MS, periods_ms=periods) == (20.0,)
    # A boxcar exactly one period wide integrates whole periods: its output is flat, nothing aliases.
    assert aliasing_periods_ms(Response("boxcar", 20 * MS, 0), 20 * MS, periods_ms=periods) == ()
    # The worst phase of a phase-locked 20 ms wave is off by half the response's peak-to-peak.
    half_p2p = amplitude_ratio(H100, 20 * MS) / 2
    assert aliasing_periods_ms(H100, 20 * MS, periods_ms=[20.0], threshold=half_p2p * 0.95) == (20.0,)
    assert aliasing_periods_ms(H100, 20 * MS, periods_ms=[20.0], threshold=half_p2p * 1.001) == ()
    # A sample clock a little off 20 ms still resonates inside the 20 ms cell, not in the next one.
    assert aliasing_periods_ms(H100, 20.08 * MS, periods_ms=periods) == (20.0,)
    # Readings every 20 ms visit five phases of a 100 ms wave. Through a 5 ms boxcar, 2 or 3 of them read busy
    # (away from the 5 ms ramps): the mean is 0.4 or 0.6, off by 0.1 ...
    five = Response("boxcar", 5 * MS, 0)
    assert aliasing_periods_ms(five, 20 * MS, periods_ms=[100.0], threshold=0.099) == (100.0,)
    assert aliasing_periods_ms(five, 20 * MS, periods_ms=[100.0], threshold=0.101) == ()
    # ... while the H100 low-pass passes the fifth harmonic, 2 / (5 pi) of the swing, at 1 / |1 + i 2 pi 5 tau / P|
    # = 0.27: a bias of 0.034 plus higher harmonics.
    assert aliasing_periods_ms(H100, 20 * MS, periods_ms=[100.0], threshold=0.045) == ()
    assert aliasing_periods_ms(H100, 20 * MS, periods_ms=[100.0], threshold=0.03) == (100.0,)


# -- plumbing -------------------------------------------------------------------------------------------------------


def test_distinct_readings_and_square_detection() -> None:
    run = Run(np.array([1, 2, 3, 4, 5]), np.array([1.0, 1.0, 2.0, 2.0, 1.0]), np.empty((0, 2), np.int64), "x")
    stamps, reading = distinct_readings(run)
    assert stamps.tolist() == [1, 3, 5] and reading.tolist() == [1.0, 2.0, 1.0]
    assert square_wave_period_ns(square(0, 23 * MS, 500 * MS)) == pytest.approx((23 * MS, 0.5))
    assert square_wave_period_ns(np.array([[0, 5], [10, 15]])) is None
    assert square_wave_period_ns(np.array([[0, 5], [10, 15], [40, 45]])) is None
    with pytest.raises(ValueError, match="strictly increasing"):
        distinct_readings(Run(np.array([2, 1, 3]), np.array([1.0, 2.0, 3.0]), np.empty((0, 2), np.int64), "x"))


def test_fit_rejects_unusable_input() -> None:
    stamps = T0 + np.arange(10, dtype=np.int64) * 20 * MS
    idle = Run(stamps, np.linspace(100, 101, 10), np.empty((0, 2), np.int64), "idle")
    with pytest.raises(ValueError, match="need at least one run"):
        fit_model("lowpass", [])
    with pytest.raises(ValueError, match="no run has a busy interval"):
        fit_model("lowpass", [idle])
    with pytest.raises(ValueError, match="unknown response kind"):
        fit_model("gaussian", [idle])
    with pytest.raises(ValueError, match="search grid"):
        SearchGrid(shape_min_ns=2e6, shape_max_ns=1e6)


def test_t_quantiles() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(30) == pytest.approx(2.042, abs=1e-3)
    assert t975(31) == pytest.approx(2.0395, abs=1e-3)
    assert t975(10**6) == pytest.approx(1.95997, abs=1e-4)
    assert t975(0) == math.inf
    values = [t975(d) for d in range(1, 200)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_source_calibration_carries_the_fit() -> None:
    fit = fit_source(
        "samples", recordings(np.random.default_rng(9), H100, periods_ms=(23, 37), square_ms=1500), grid=SMALL_GRID
    )
    cal = source_calibration(fit, None)
    assert (cal.source, cal.model, cal.shape_ns, cal.delay_ns) == (
        "samples",
        "lowpass",
        fit.best.shape_ns,
        fit.best.delay_ns,
    )
    assert cal.response() == fit.best.response()
    assert cal.amplitudes == fit.amplitudes and cal.aliasing_periods_ms == fit.aliasing_periods_ms
    assert cal.rise_10_90_ns is None and cal.first_change_delay_ns is None
