"""Sensor response models: analytic cases, independent brute-force evaluation, amplitude ratios."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattscope.response import (
    Response,
    Schedule,
    amplitude_ratio,
    filtered_indicator,
    predicted_reading_w,
    square_wave_response,
)

MS = 1_000_000
T0 = 5 * 10**15  # a monotonic clock two months after boot: beyond float64's exact-ns range
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def square_busy(t0: int, period_ns: int, n: int, duty: float = 0.5) -> np.ndarray:
    starts = t0 + period_ns * np.arange(n, dtype=np.int64)
    return np.stack([starts, starts + int(round(duty * period_ns))], axis=1)


# -- brute force, written independently of the module (O(n * m) sums over intervals) --------------------------------


def brute_boxcar(busy: np.ndarray, stamps: np.ndarray, width: float, delay: float) -> np.ndarray:
    out = np.zeros(stamps.size)
    for i, t in enumerate(stamps):
        hi = float(t - T0) - delay
        lo = hi - width
        overlap = sum(max(0.0, min(hi, float(b - T0)) - max(lo, float(a - T0))) for a, b in busy)
        out[i] = overlap / width
    return out


def brute_lowpass(busy: np.ndarray, stamps: np.ndarray, tau: float, delay: float) -> np.ndarray:
    # y(x) = sum over intervals of the low-pass response to a unit pulse on [a, b): exact for disjoint intervals.
    out = np.zeros(stamps.size)
    for i, t in enumerate(stamps):
        x = float(t - T0) - delay
        total = 0.0
        for a, b in busy:
            a_rel, b_rel = float(a - T0), float(b - T0)
            if a_rel < x:
                total += math.exp(-(x - min(b_rel, x)) / tau) - math.exp(-(x - a_rel) / tau)
        out[i] = total
    return out


@st.composite
def schedules(draw: st.DrawFn) -> np.ndarray:
    gaps = draw(st.lists(st.integers(1, 40 * MS), min_size=2, max_size=16))
    edges = T0 + np.cumsum(np.asarray(gaps, dtype=np.int64))
    edges = edges[: edges.size // 2 * 2]
    return edges.reshape(-1, 2)


# -- Response -------------------------------------------------------------------------------------------------------


def test_response_validates_and_reports_group_delay() -> None:
    assert Response("boxcar", 20 * MS, 3 * MS).group_delay_ns() == 13 * MS
    assert Response("lowpass", 11.5 * MS, 2 * MS).group_delay_ns() == 13.5 * MS
    with pytest.raises(ValueError, match="unknown response kind"):
        Response("gaussian", 1.0, 0.0)
    with pytest.raises(ValueError, match="shape_ns"):
        Response("lowpass", 0.0, 0.0)
    with pytest.raises(ValueError, match="delay_ns"):
        Response("boxcar", 1.0, math.inf)


# -- analytic cases -------------------------------------------------------------------------------------------------


def test_lowpass_step_response_is_one_minus_exp_after_the_delay() -> None:
    tau, delay = 11.5 * MS, 3 * MS
    busy = np.array([[T0, T0 + 200 * MS]])
    stamps = T0 + np.arange(-10 * MS, 400 * MS, 250_000, dtype=np.int64)
    y = filtered_indicator(busy, stamps, Response("lowpass", tau, delay))
    x = (stamps - T0).astype(float) - delay
    rise = np.where(x > 0, -np.expm1(-np.clip(x, 0, None) / tau), 0.0)
    end_level = -math.expm1(-200 * MS / tau)
    fall = end_level * np.exp(-np.clip(x - 200 * MS, 0, None) / tau)
    expected = np.where(x <= 200 * MS, rise, fall)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)
    assert y[(x <= 0)].max() == 0.0
    # One tau after the delayed edge the output is 1 - 1/e.
    at_tau = filtered_indicator(busy, np.array([T0 + int(delay + tau)]), Response("lowpass", tau, delay))
    assert at_tau[0] == pytest.approx(1 - math.exp(-1), abs=1e-12)


def test_boxcar_ramps_linearly_over_its_width() -> None:
    width, delay = 25 * MS, 5 * MS
    busy = np.array([[T0, T0 + 100 * MS]])
    stamps = T0 + np.arange(-10 * MS, 200 * MS, 100_000, dtype=np.int64)
    y = filtered_indicator(busy, stamps, Response("boxcar", width, delay))
    x = (stamps - T0).astype(float) - delay
    expected = np.clip(x / width, 0, 1) - np.clip((x - 100 * MS) / width, 0, 1)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)
    assert y[np.searchsorted(stamps, T0 + delay + width // 2)] == pytest.approx(0.5, abs=1e-3)


@PROPS
@given(
    busy=schedules(),
    kind=st.sampled_from(["boxcar", "lowpass"]),
    shape_ms=st.floats(0.05, 80.0),
    delay_ms=st.floats(-5.0, 30.0),
    stamp_offsets=st.lists(st.integers(-20 * MS, 700 * MS), min_size=1, max_size=40),
)
def test_filtered_indicator_matches_brute_force(busy, kind, shape_ms, delay_ms, stamp_offsets) -> None:
    stamps = T0 + np.asarray(stamp_offsets, dtype=np.int64)
    response = Response(kind, shape_ms * MS, delay_ms * MS)
    y = filtered_indicator(busy, stamps, response)
    brute = brute_boxcar if kind == "boxcar" else brute_lowpass
    np.testing.assert_allclose(y, brute(busy, stamps, shape_ms * MS, delay_ms * MS), rtol=0, atol=1e-9)
    assert ((y >= 0) & (y <= 1)).all()


@PROPS
@given(busy=schedules(), kind=st.sampled_from(["boxcar", "lowpass"]), seed=st.integers(0, 2**32 - 1))
def test_overlapping_and_unsorted_intervals_are_merged(busy, kind, seed) -> None:
    rng = np.random.default_rng(seed)
    # Split every interval in two overlapping halves and shuffle: the busy indicator is unchanged.
    mid = (busy[:, 0] + busy[:, 1]) // 2
    pieces = np.concatenate(
        [np.stack([busy[:, 0], np.minimum(mid + 1, busy[:, 1])], 1), np.stack([mid, busy[:, 1]], 1)]
    )
    pieces = pieces[rng.permutation(len(pieces))]
    stamps = T0 + rng.integers(0, 700 * MS, 30)
    response = Response(kind, 7 * MS, 1 * MS)
    np.testing.assert_allclose(
        filtered_indicator(pieces, stamps, response), filtered_indicator(busy, stamps, response), rtol=0, atol=1e-12
    )


def test_shifting_everything_changes_nothing() -> None:
    busy = square_busy(T0, 23 * MS, 30)
    stamps = T0 + np.arange(0, 800 * MS, 7 * MS, dtype=np.int64)
    for kind in ("boxcar", "lowpass"):
        response = Response(kind, 9 * MS, 2 * MS)
        shift = 123_456_789_012
        np.testing.assert_allclose(
            filtered_indicator(busy + shift, stamps + shift, response),
            filtered_indicator(busy, stamps, response),
            rtol=0,
            atol=1e-12,
        )


def test_empty_schedule_reads_idle_and_bad_input_is_rejected() -> None:
    stamps = T0 + np.arange(5, dtype=np.int64)
    assert (filtered_indicator(np.empty((0, 2), dtype=np.int64), stamps, Response("lowpass", MS, 0)) == 0).all()
    with pytest.raises(ValueError, match="shape"):
        filtered_indicator(np.array([1, 2, 3]), stamps, Response("lowpass", MS, 0))
    with pytest.raises(ValueError, match="ends before it starts"):
        filtered_indicator(np.array([[5, 1]]), stamps, Response("lowpass", MS, 0))
    with pytest.raises(ValueError, match="integer"):
        filtered_indicator(np.array([[0, 5]]), stamps.astype(float), Response("lowpass", MS, 0))
    with pytest.raises(ValueError, match="resolution_ns"):
        filtered_indicator(np.array([[0, 5]]), stamps, Response("lowpass", MS, 0), resolution_ns=0)


def test_predicted_reading_maps_levels() -> None:
    busy = np.array([[T0, T0 + 50 * MS]])
    stamps = T0 + np.array([-MS, 10 * MS, 300 * MS], dtype=np.int64)
    response = Response("boxcar", 20 * MS, 0)
    np.testing.assert_allclose(predicted_reading_w(busy, stamps, response, 100.0, 300.0), [100.0, 200.0, 100.0])


def test_filtered_indicator_is_fast() -> None:
    busy = square_busy(T0, 10 * MS, 6000)  # 60 s of a 10 ms square wave: 12 000 edges
    stamps = T0 + np.linspace(0, 60e9, 10_000).astype(np.int64)
    for kind in ("boxcar", "lowpass"):
        start = time.perf_counter()
        filtered_indicator(busy, stamps, Response(kind, 11.5 * MS, 2 * MS))
        assert time.perf_counter() - start < 0.1


# -- amplitude ratio ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("period_ms", [13, 17, 23, 29, 37, 100])
def test_lowpass_amplitude_ratio_is_tanh(period_ms: int) -> None:
    response = Response("lowpass", 11.5 * MS, 4 * MS)
    assert amplitude_ratio(response, period_ms * MS) == pytest.approx(math.tanh(period_ms / (4 * 11.5)), rel=1e-12)


def test_boxcar_amplitude_ratio_geometry() -> None:
    assert amplitude_ratio(Response("boxcar", 10 * MS, 0), 40 * MS) == 1.0  # window fits in the busy half
    assert amplitude_ratio(Response("boxcar", 40 * MS, 0), 20 * MS) == pytest.approx(0.0, abs=1e-12)  # 2 periods
    assert amplitude_ratio(Response("boxcar", 25 * MS, 0), 20 * MS) == pytest.approx(5 / 25)
    assert amplitude_ratio(Response("boxcar", 30 * MS, 9 * MS), 40 * MS, duty=0.25) == pytest.approx(10 / 30)


@PROPS
@given(
    kind=st.sampled_from(["boxcar", "lowpass"]),
    shape_ms=st.floats(1.0, 60.0),
    period_ms=st.floats(4.0, 120.0),
    duty=st.floats(0.1, 0.9),
    delay_ms=st.floats(-3.0, 20.0),
)
def test_amplitude_ratio_matches_simulated_steady_state(kind, shape_ms, period_ms, duty, delay_ms) -> None:
    response = Response(kind, shape_ms * MS, delay_ms * MS)
    period = int(period_ms * MS)
    n = int(1.6e9 / period) + 10  # settle >= 26 tau of the slowest low-pass (e^-26 < 1e-11), then read 2 periods
    busy = square_busy(T0, period, n, duty)
    duty_exact = float(busy[0, 1] - busy[0, 0]) / period
    last = T0 + (n - 3) * period
    stamps = last + np.linspace(0, 2 * period, 4001).astype(np.int64)
    y = filtered_indicator(busy, stamps, response)
    expected = amplitude_ratio(response, period, duty_exact)
    # The grid resolves the peaks to within one step of the steepest slope (1 / min(shape, tau)).
    step_ns = 2 * period / 4000
    assert y.max() - y.min() == pytest.approx(expected, abs=2 * step_ns / (shape_ms * MS) + 1e-9)
    wave = square_wave_response(response, period, (stamps - T0).astype(float), duty_exact)
    np.testing.assert_allclose(wave, y, rtol=0, atol=1e-9)
    # A linear filter that preserves constants keeps the mean: the duty.
    phases = np.linspace(0, period, 20_000, endpoint=False)
    assert square_wave_response(response, period, phases, duty_exact).mean() == pytest.approx(duty_exact, abs=2e-3)


def test_schedule_busy_time_accumulates() -> None:
    schedule = Schedule(np.array([[10, 20], [30, 50]]), origin_ns=0)
    np.testing.assert_allclose(schedule.busy_time(np.array([0.0, 15.0, 25.0, 40.0, 60.0])), [0, 5, 10, 20, 30])
