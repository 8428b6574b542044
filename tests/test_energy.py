"""Property tests for wattscope.energy (pure numpy; no compiled module needed)."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from wattscope import energy as we
except Exception:  # the package __init__ may need the compiled core, which may not be built here
    _path = Path(__file__).resolve().parents[1] / "python" / "wattscope" / "energy.py"
    _spec = importlib.util.spec_from_file_location("_wattscope_energy_under_test", _path)
    assert _spec is not None and _spec.loader is not None
    we = importlib.util.module_from_spec(_spec)
    # dataclasses resolves the defining module through sys.modules.
    sys.modules[_spec.name] = we
    _spec.loader.exec_module(we)

integrate_window = we.integrate_window
counter_delta_j = we.counter_delta_j

MS = 1_000_000
PERIOD = 20 * MS
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(x: float, y: float, scale: float, rel: float = 1e-9) -> bool:
    """|x - y| within rel of the larger of |y| and a problem scale (for results near 0)."""
    return abs(x - y) <= rel * max(abs(y), scale) + 1e-15


def reason_sizes(reasons: tuple[str, ...]) -> list[float]:
    return [float(re.search(r"([-+0-9.e]+) J$", r).group(1)) for r in reasons]


def regular(n: int, power: np.ndarray | float, t0: int = 10**12, period: int = PERIOD):
    t = t0 + period * np.arange(1, n + 1, dtype=np.int64)
    p = np.broadcast_to(np.asarray(power, dtype=np.float64), (n,)).copy()
    return t, p


# ---------------------------------------------------------------------------------------------------------------
# Piecewise-constant "true" power signals and a boxcar sensor.


class Signal:
    """Piecewise-constant power: values[i] W on [edges[i], edges[i+1]) ns."""

    def __init__(self, lo: int, hi: int, breaks: list[int], values: list[float]):
        self.edges = [lo, *breaks, hi]
        self.values = values

    def integral_wns(self, a: int, b: int) -> float:
        total = 0.0
        for x0, x1, v in zip(self.edges[:-1], self.edges[1:], self.values, strict=True):
            o = min(x1, b) - max(x0, a)
            if o > 0:
                total += v * o
        return total

    def value_range(self, a: int, b: int) -> float:
        vs = [
            v for x0, x1, v in zip(self.edges[:-1], self.edges[1:], self.values, strict=True) if min(x1, b) > max(x0, a)
        ]
        return max(vs) - min(vs)


milliwatts = st.integers(0, 1_000_000).map(lambda mw: mw / 1000)  # NVML reports integer mW


@st.composite
def boxcar_cases(draw):
    period = draw(st.integers(1_000, 50 * MS))
    n = draw(st.integers(2, 30))
    t0 = draw(st.integers(-(10**12), 10**12))
    t = t0 + period * np.arange(n, dtype=np.int64)
    lo, hi = t0 - period, int(t[-1])
    breaks = sorted(set(draw(st.lists(st.integers(lo + 1, hi - 1), max_size=12))))
    values = draw(st.lists(milliwatts, min_size=len(breaks) + 1, max_size=len(breaks) + 1))
    sig = Signal(lo, hi, breaks, values)
    p = np.array([sig.integral_wns(int(tk) - period, int(tk)) / period for tk in t])
    return period, t, p, sig


@st.composite
def traces(draw, min_n: int = 2, max_n: int = 40):
    """Irregular stamps with occasional gaps and mW powers."""
    n = draw(st.integers(min_n, max_n))
    spacing = st.one_of(
        st.integers(PERIOD - 5 * MS, PERIOD + 5 * MS),
        st.integers(PERIOD - 5 * MS, PERIOD + 5 * MS),
        st.integers(PERIOD - 5 * MS, PERIOD + 5 * MS),
        st.integers(3 * PERIOD, 20 * PERIOD),  # lost samples
    )
    d = draw(st.lists(spacing, min_size=n - 1, max_size=n - 1))
    t0 = draw(st.integers(0, 10**13))
    t = np.concatenate(([t0], t0 + np.cumsum(np.asarray(d, dtype=np.int64)))).astype(np.int64)
    p = np.asarray(draw(st.lists(milliwatts, min_size=n, max_size=n)))
    return t, p


# ---------------------------------------------------------------------------------------------------------------
# Constant power


@PROPS
@given(
    st.integers(2, 50),
    st.floats(0.5, 1000),
    st.data(),
)
def test_constant_power_is_exact_with_zero_uncertainty(n, power, data):
    jitter = data.draw(st.lists(st.integers(-4 * MS, 4 * MS), min_size=n, max_size=n))
    t = 10**12 + PERIOD * np.arange(1, n + 1, dtype=np.int64) + np.asarray(jitter, dtype=np.int64)
    p = np.full(n, power)
    period = round(float(np.median(np.diff(t)))) if n >= 2 else PERIOD
    lo, hi = int(t[0]) - period, int(t[-1])
    a = data.draw(st.integers(lo, hi - 1))
    b = data.draw(st.integers(a + 1, hi))
    tau = data.draw(st.sampled_from([0, 11_500_000]))
    r = integrate_window(t, p, a, b, sensor_tau_ns=tau)
    assert close(r.energy_j, power * (b - a) / 1e9, 0.0)
    assert r.uncertainty_j == 0.0
    assert r.uncertainty_reasons == ()
    assert r.coverage == 1.0
    assert r.gaps_ns.shape == (0, 2)
    assert close(r.mean_power_w, power, 0.0)
    assert r.peak_power_w == power


def test_constant_power_simple_numbers():
    t, p = regular(10, 250.0)
    r = integrate_window(t, p, int(t[0]), int(t[-1]))
    assert r.energy_j == pytest.approx(250.0 * 9 * 0.020, rel=1e-12)
    assert r.duration_s == pytest.approx(0.18)
    assert r.covered_s == pytest.approx(0.18)
    assert r.n_samples == 9  # sample 0's interval ends at the window start
    assert r.uncertainty_j == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Boxcar sensor: each sample is the exact mean of the true signal over its period.


@PROPS
@given(boxcar_cases(), st.data())
def test_boxcar_exact_on_stamps(case, data):
    period, t, p, sig = case
    stamps = [int(t[0]) - period, *map(int, t)]
    i = data.draw(st.integers(0, len(stamps) - 2))
    j = data.draw(st.integers(i + 1, len(stamps) - 1))
    a, b = stamps[i], stamps[j]
    r = integrate_window(t, p, a, b)
    truth_j = sig.integral_wns(a, b) / 1e9
    assert close(r.energy_j, truth_j, max(sig.values) * (b - a) / 1e9)
    assert r.coverage == 1.0


@PROPS
@given(boxcar_cases(), st.data())
def test_boxcar_arbitrary_edges_within_bound(case, data):
    period, t, p, sig = case
    lo, hi = int(t[0]) - period, int(t[-1])
    a = data.draw(st.integers(lo, hi - 1))
    b = data.draw(st.integers(a + 1, hi))
    r = integrate_window(t, p, a, b)
    err_j = r.energy_j - sig.integral_wns(a, b) / 1e9

    def containing(x: int) -> int | None:
        """Index of the sample whose interval has x strictly inside, if any."""
        k = int(np.searchsorted(t, x, side="right"))
        return k if k < t.size and int(t[k]) - period < x else None

    bound_wns = 0.0
    for x in (a, b):
        k = containing(x)
        if k is not None:
            bound_wns += period * sig.value_range(int(t[k]) - period, int(t[k]))
    tol = 1e-9 * max(sig.values) * (b - a) / 1e9 + 1e-12
    assert abs(err_j) <= bound_wns / 1e9 + tol

    ka, kb = containing(a), containing(b)
    if ka is not None and ka >= 1 and p[ka] != p[ka - 1]:
        assert r.uncertainty_j > 0
    if kb is not None and kb + 1 < t.size and p[kb] != p[kb + 1]:
        assert r.uncertainty_j > 0


def test_edge_term_value():
    # Start edge halfway into a 300 W sample whose outer neighbour read 100 W: min(10 ms, 10 ms) * 200 W / 2.
    t, p = regular(10, 100.0)
    p[5] = 300.0
    p[6:] = 300.0
    a = int(t[4]) + 10 * MS
    b = int(t[9])
    r = integrate_window(t, p, a, b)
    assert r.uncertainty_j == pytest.approx(10e-3 * 200 / 2, rel=1e-12)
    assert len(r.uncertainty_reasons) == 1
    assert r.uncertainty_reasons[0].startswith("start edge")
    assert r.energy_j == pytest.approx(300.0 * (b - a) / 1e9, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Algebraic properties


@PROPS
@given(traces(), st.data())
def test_additivity(trace, data):
    t, p = trace
    period = round(float(np.median(np.diff(t))))
    lo, hi = int(t[0]) - period, int(t[-1])
    b = data.draw(st.integers(lo + 1, hi - 1))
    a = data.draw(st.integers(lo - 3 * PERIOD, b - 1))
    c = data.draw(st.integers(b + 1, hi + 3 * PERIOD))
    whole = integrate_window(t, p, a, c)
    left = integrate_window(t, p, a, b)
    right = integrate_window(t, p, b, c)
    scale = max(float(p.max()), 1.0) * (c - a) / 1e9
    assert close(whole.energy_j, left.energy_j + right.energy_j, scale)
    assert close(whole.covered_s, left.covered_s + right.covered_s, (c - a) / 1e9)
    gap_len = lambda r: int((r.gaps_ns[:, 1] - r.gaps_ns[:, 0]).sum())  # noqa: E731
    assert gap_len(whole) == gap_len(left) + gap_len(right)


@PROPS
@given(traces(), st.floats(1e-3, 1e3), st.integers(-(10**12), 10**12), st.data())
def test_linearity_and_shift_invariance(trace, c, shift, data):
    t, p = trace
    period = round(float(np.median(np.diff(t))))
    lo, hi = int(t[0]) - period, int(t[-1])
    a = data.draw(st.integers(lo - PERIOD, hi - 1))
    b = data.draw(st.integers(max(a, lo) + 1, hi + PERIOD))
    tau = data.draw(st.sampled_from([0, 11_500_000]))
    base = integrate_window(t, p, a, b, sensor_tau_ns=tau)
    scaled = integrate_window(t, c * p, a, b, sensor_tau_ns=tau)
    scale = max(float(p.max()), 1.0) * (b - a) / 1e9
    assert close(scaled.energy_j, c * base.energy_j, c * scale)
    assert close(scaled.uncertainty_j, c * base.uncertainty_j, c * scale)
    shifted = integrate_window(t + shift, p, a + shift, b + shift, sensor_tau_ns=tau)
    assert shifted.energy_j == base.energy_j
    assert shifted.uncertainty_j == base.uncertainty_j
    assert shifted.coverage == base.coverage
    np.testing.assert_array_equal(shifted.gaps_ns, base.gaps_ns + shift)


@PROPS
@given(traces(min_n=1), st.data())
def test_invariants(trace, data):
    t, p = trace
    period = round(float(np.median(np.diff(t)))) if t.size >= 2 else PERIOD
    lo, hi = int(t[0]) - period, int(t[-1])
    a = data.draw(st.integers(lo - 2 * PERIOD, hi - 1))
    b = data.draw(st.integers(max(a, lo) + 1, hi + 2 * PERIOD))
    tau = data.draw(st.sampled_from([0, 11_500_000]))
    r = integrate_window(t, p, a, b, period_ns=period if t.size == 1 else None, sensor_tau_ns=tau)
    dur = b - a
    assert 0.0 <= r.coverage <= 1.0
    # every window nanosecond is either covered by a sample interval or listed as a gap
    gaps = r.gaps_ns
    assert gaps.dtype == np.int64 and gaps.ndim == 2 and gaps.shape[1] == 2
    assert np.all(gaps[:, 0] < gaps[:, 1])
    assert np.all(gaps[:, 0] >= a) and np.all(gaps[:, 1] <= b)
    assert np.all(gaps[1:, 0] > gaps[:-1, 1])
    assert round(r.covered_s * 1e9) + int((gaps[:, 1] - gaps[:, 0]).sum()) == dur
    # every fill is a convex combination of sample powers
    tol = 1e-9 * float(p.max()) * dur / 1e9 + 1e-12
    assert float(p.min()) * dur / 1e9 - tol <= r.energy_j <= float(p.max()) * dur / 1e9 + tol
    assert r.uncertainty_j >= 0.0
    assert (r.uncertainty_j == 0.0) == (r.uncertainty_reasons == ())
    sizes = reason_sizes(r.uncertainty_reasons)
    assert sizes == sorted(sizes, reverse=True)
    if r.n_samples:
        assert float(p.min()) <= r.peak_power_w <= float(p.max())
    else:
        assert math.isnan(r.peak_power_w)


# ---------------------------------------------------------------------------------------------------------------
# Gaps, heads and tails


@PROPS
@given(
    st.integers(3, 20),
    st.integers(2, 10),
    st.lists(milliwatts, min_size=40, max_size=40),
)
def test_missing_run_is_a_filled_gap(i, m, powers):
    t, p = regular(40, np.asarray(powers))
    keep = np.ones(t.size, bool)
    keep[i : i + m] = False  # samples i .. i+m-1 lost: spacing (m + 1) periods > 2.5 periods
    tg, pg = t[keep], p[keep]
    a, b = int(t[0]), int(t[-1])
    r = integrate_window(tg, pg, a, b, period_ns=PERIOD)
    before, after = i - 1, i + m
    gap_from, gap_to = int(t[before]), int(t[after]) - PERIOD
    np.testing.assert_array_equal(r.gaps_ns, [[gap_from, gap_to]])
    assert r.coverage < 1.0
    assert r.covered_s == pytest.approx((b - a - (gap_to - gap_from)) / 1e9, rel=1e-12)
    sample_wns = sum(pg[k] * PERIOD for k in range(1, pg.size))
    fill_wns = (p[before] + p[after]) / 2 * (gap_to - gap_from)
    assert close(r.energy_j, (sample_wns + fill_wns) / 1e9, max(1.0, float(p.max())) * (b - a) / 1e9)
    if p[before] != p[after]:
        assert any("gap" in s for s in r.uncertainty_reasons)
        assert r.uncertainty_j >= (gap_to - gap_from) * abs(p[before] - p[after]) / 2 / 1e9 * (1 - 1e-12)


def test_single_missing_sample_is_not_a_gap():
    t, p = regular(10, np.arange(10.0) * 10)
    tg, pg = np.delete(t, 4), np.delete(p, 4)
    r = integrate_window(tg, pg, int(t[0]), int(t[-1]))
    assert r.coverage == 1.0
    # sample 5 now covers both periods
    expected = sum(p[k] for k in range(1, 10) if k not in (4, 5)) * 0.020 + p[5] * 0.040
    assert r.energy_j == pytest.approx(expected, rel=1e-12)


def test_tail_and_head_are_filled_and_reported():
    t, p = regular(5, [100.0, 200.0, 300.0, 400.0, 500.0])
    a = int(t[0]) - PERIOD - 30 * MS
    b = int(t[-1]) + 50 * MS
    r = integrate_window(t, p, a, b)
    np.testing.assert_array_equal(r.gaps_ns, [[a, int(t[0]) - PERIOD], [int(t[-1]), b]])
    expected = 100 * 0.030 + (100 + 200 + 300 + 400 + 500) * 0.020 + 500 * 0.050
    assert r.energy_j == pytest.approx(expected, rel=1e-12)
    assert r.covered_s == pytest.approx(0.100)
    assert r.coverage == pytest.approx(0.100 / 0.180)
    head_j, tail_j = 0.030 * 100 / 2, 0.050 * 500 / 2
    assert r.uncertainty_j == pytest.approx(math.hypot(head_j, tail_j), rel=1e-12)
    assert "after the last sample" in r.uncertainty_reasons[0]
    assert "before the first sample" in r.uncertainty_reasons[1]


def test_window_inside_a_gap():
    t = np.array([0, 20, 40, 200, 220], dtype=np.int64) * MS
    p = np.array([100.0, 100.0, 100.0, 300.0, 300.0])
    r = integrate_window(t, p, 60 * MS, 100 * MS, period_ns=PERIOD)
    assert r.n_samples == 0
    assert math.isnan(r.peak_power_w)
    assert r.coverage == 0.0
    assert r.energy_j == pytest.approx(200.0 * 0.040)
    np.testing.assert_array_equal(r.gaps_ns, [[60 * MS, 100 * MS]])


def test_caller_period_wins():
    t = np.array([0, 100 * MS], dtype=np.int64)
    p = np.array([50.0, 150.0])
    r = integrate_window(t, p, -10 * MS, 100 * MS, period_ns=PERIOD)
    # sample 1 covers only (80, 100] ms: 20 ms after a 100 ms spacing > 2.5 * 20 ms is a gap
    np.testing.assert_array_equal(r.gaps_ns, [[0, 80 * MS]])
    assert r.energy_j == pytest.approx(50 * 0.010 + 100 * 0.080 + 150 * 0.020)
    # median spacing alone (100 ms) would have made it one regular interval
    r2 = integrate_window(t, p, -10 * MS, 100 * MS)
    assert r2.coverage == 1.0


def test_single_sample_needs_period():
    t, p = np.array([5 * MS]), np.array([42.0])
    with pytest.raises(ValueError, match="period_ns"):
        integrate_window(t, p, 0, 5 * MS)
    r = integrate_window(t, p, 0, 5 * MS, period_ns=PERIOD)
    assert r.energy_j == pytest.approx(42.0 * 0.005)


# ---------------------------------------------------------------------------------------------------------------
# Uncertainty reasons


def test_short_window_reason():
    t, p = regular(10, [100.0, 100.0, 100.0, 100.0, 400.0, 100.0, 100.0, 100.0, 100.0, 100.0])
    a = int(t[3]) + 4 * MS
    r = integrate_window(t, p, a, a + 12 * MS)
    assert any(
        re.fullmatch(r"window shorter than 2 sensor periods \(12\.0 ms < 40\.0 ms\): .* J", s)
        for s in r.uncertainty_reasons
    ), r.uncertainty_reasons
    # edge terms are raised to at least half a period times the spread (300 W both sides)
    assert r.uncertainty_j >= math.hypot(0.5 * 0.020 * 300, 0.5 * 0.020 * 300) * (1 - 1e-12)
    long = integrate_window(t, p, a, a + 60 * MS)
    assert not any("shorter" in s for s in long.uncertainty_reasons)


def test_sensor_tau_term():
    t, p = regular(10, 100.0)
    p[5:] = 350.0
    tau = 11_500_000
    r = integrate_window(t, p, int(t[4]), int(t[9]), sensor_tau_ns=tau)
    assert r.uncertainty_j == pytest.approx(tau * 250.0 / 1e9, rel=1e-12)
    assert r.uncertainty_reasons[0].startswith("sensor response")
    assert integrate_window(t, p, int(t[4]), int(t[9])).uncertainty_j == 0.0


def test_zero_length_window():
    t, p = regular(5, 100.0)
    r = integrate_window(t, p, int(t[2]), int(t[2]))
    assert r.energy_j == 0.0 and r.duration_s == 0.0
    assert r.coverage == 1.0
    assert math.isnan(r.mean_power_w)
    assert r.uncertainty_j == 0.0
    assert r.gaps_ns.shape == (0, 2)


def test_result_is_frozen():
    t, p = regular(5, 100.0)
    r = integrate_window(t, p, int(t[0]), int(t[-1]))
    with pytest.raises(AttributeError):
        r.energy_j = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        r.gaps_ns[...] = 0


# ---------------------------------------------------------------------------------------------------------------
# Energy counter cross-check


@PROPS
@given(
    st.lists(st.integers(1, 200 * MS), min_size=1, max_size=30),
    st.integers(0, 700_000),
    st.data(),
)
def test_counter_linear_is_exact(spacings, rate_mw, data):
    t = np.concatenate(([10**12], 10**12 + np.cumsum(spacings))).astype(np.int64)
    rate_w = rate_mw / 1000
    e_mj = 5e9 + rate_w * (t - t[0]) / 1e6  # mJ = W * ns / 1e6
    a = data.draw(st.integers(int(t[0]), int(t[-1])))
    b = data.draw(st.integers(a, int(t[-1])))
    got = counter_delta_j(t, e_mj, a, b)
    assert got is not None
    assert got == pytest.approx(rate_w * (b - a) / 1e9, rel=1e-9, abs=1e-9)


def test_counter_integer_dtypes_and_bracketing():
    t = np.array([0, 100, 200, 300], dtype=np.int64) * MS
    e = np.array([1_000, 26_000, 51_000, 76_000], dtype=np.uint64)  # 250 W
    assert counter_delta_j(t, e, 50 * MS, 250 * MS) == pytest.approx(50.0)
    assert counter_delta_j(t, e, 0, 300 * MS) == pytest.approx(75.0)
    assert counter_delta_j(t, e.astype(np.int64), 100 * MS, 100 * MS) == 0.0
    assert counter_delta_j(t, e, -1, 200 * MS) is None
    assert counter_delta_j(t, e, 10 * MS, 300 * MS + 1) is None
    with pytest.raises(ValueError, match="decreased"):
        counter_delta_j(t, np.array([5, 6, 4, 7]), 0, 300 * MS)
    with pytest.raises(ValueError, match="after"):
        counter_delta_j(t, e, 200 * MS, 100 * MS)
    with pytest.raises(ValueError, match="length"):
        counter_delta_j(t, e[:3], 0, 100)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("t", "p", "a", "b", "match"),
    [
        ([], [], 0, 1, "empty"),
        ([0, 20, 10], [1.0, 1.0, 1.0], 0, 10, "strictly increasing"),
        ([0, 20, 20], [1.0, 1.0, 1.0], 0, 10, "strictly increasing"),
        ([0, 20, 40], [1.0, 1.0], 0, 10, "length"),
        ([0, 20, 40], [1.0, float("nan"), 1.0], 0, 10, "finite"),
        ([0.0, 20.0, 40.0], [1.0, 1.0, 1.0], 0, 10, "integer"),
        ([[0, 20]], [[1.0, 1.0]], 0, 10, "1-D"),
        ([0, 20, 40], [1.0, 1.0, 1.0], 30, 10, "after"),
        ([100, 120, 140], [1.0, 1.0, 1.0], 0, 50, "no power samples cover the window"),
        ([100, 120, 140], [1.0, 1.0, 1.0], 150, 200, "no power samples cover the window"),
        ([100, 120, 140], [1.0, 1.0, 1.0], 150, 150, "no power samples cover the window"),
    ],
)
def test_bad_input(t, p, a, b, match):
    with pytest.raises(ValueError, match=match):
        integrate_window(np.asarray(t), np.asarray(p), a, b)


def test_bad_options():
    t, p = regular(5, 1.0)
    with pytest.raises(ValueError, match="period_ns"):
        integrate_window(t, p, int(t[0]), int(t[1]), period_ns=0)
    with pytest.raises(ValueError, match="max_interval_ns"):
        integrate_window(t, p, int(t[0]), int(t[1]), max_interval_ns=-1)
    with pytest.raises(ValueError, match="sensor_tau_ns"):
        integrate_window(t, p, int(t[0]), int(t[1]), sensor_tau_ns=-1)
    with pytest.raises(TypeError, match="start_ns"):
        integrate_window(t, p, 1.5, int(t[1]))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Scale


def test_million_samples():
    rng = np.random.default_rng(0)
    n = 1_000_000
    t = 10**12 + np.cumsum(rng.integers(15 * MS, 25 * MS, n)).astype(np.int64)
    t[500_000:] += 10 * PERIOD  # one outage
    p = rng.uniform(100.0, 700.0, n)
    r = integrate_window(t, p, int(t[0]), int(t[-1]), sensor_tau_ns=11_500_000)
    assert r.n_samples == n - 1
    assert r.gaps_ns.shape == (1, 2)
    assert 100.0 <= r.mean_power_w <= 700.0
    small = integrate_window(t, p, int(t[123_456]) + 3 * MS, int(t[123_470]))
    assert small.n_samples == 14  # samples 123_457 .. 123_470
