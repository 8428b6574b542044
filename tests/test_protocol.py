"""Measurement protocol: window length from the sensor model, stratified phase offsets, the plan."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattscope.calibration.protocol import Protocol, min_window_s, phase_offsets_s, plan
from wattscope.response import Response

MS = 1_000_000
H100 = Response("lowpass", 11.5 * MS, 3 * MS)
responses = st.builds(
    Response, st.sampled_from(["boxcar", "lowpass"]), st.floats(0.1 * MS, 2000 * MS), st.floats(-5 * MS, 100 * MS)
)


def test_h100_window_lengths() -> None:
    # sqrt(2) * (11.5 ms + 10 ms) / target
    assert min_window_s(H100, 20 * MS, 0.02) == pytest.approx(math.sqrt(2) * 21.5e-3 / 0.02)
    assert min_window_s(H100, 20 * MS, 0.01) == pytest.approx(3.04, abs=0.01)
    # A boxcar's memory is half its width; the pure delay does not count.
    assert Response("boxcar", 1000 * MS, 80 * MS).memory_ns() == 500 * MS
    assert min_window_s(Response("boxcar", 1000 * MS, 80 * MS), 100 * MS, 0.05) == pytest.approx(
        math.sqrt(2) * 0.55 / 0.05
    )


@given(
    response=responses,
    period_ms=st.floats(1.0, 1000.0),
    a=st.floats(1e-4, 0.99),
    b=st.floats(1e-4, 0.99),
    fraction=st.floats(0.0, 1.0),
)
def test_window_is_monotone_in_target_and_floored(response, period_ms, a, b, fraction) -> None:
    loose, tight = max(a, b), min(a, b)
    period = period_ms * MS
    w_tight = min_window_s(response, period, tight, step_fraction=fraction)
    w_loose = min_window_s(response, period, loose, step_fraction=fraction)
    assert w_tight >= w_loose >= 2 * period / 1e9
    # Smaller steps need shorter windows.
    assert min_window_s(response, period, tight) >= w_tight


def test_window_argument_checks() -> None:
    with pytest.raises(ValueError, match="target_rel_uncertainty"):
        min_window_s(H100, 20 * MS, 0.0)
    with pytest.raises(ValueError, match="sample_period_ns"):
        min_window_s(H100, -1.0, 0.02)
    with pytest.raises(ValueError, match="step_fraction"):
        min_window_s(H100, 20 * MS, 0.02, step_fraction=1.5)


@settings(max_examples=100)
@given(n=st.integers(1, 64), period_s=st.floats(1e-4, 10.0), seed=st.integers(0, 2**32 - 1))
def test_offsets_are_stratified(n: int, period_s: float, seed: int) -> None:
    offsets = phase_offsets_s(n, period_s, np.random.default_rng(seed))
    assert offsets.shape == (n,)
    assert ((offsets >= 0) & (offsets < period_s)).all()
    strata = np.floor(np.sort(offsets) / period_s * n).astype(int)
    assert (strata == np.arange(n)).all()


def test_offsets_are_shuffled_and_random() -> None:
    draws = [phase_offsets_s(8, 0.02, np.random.default_rng(seed)) for seed in range(10)]
    assert any((np.diff(d) < 0).any() for d in draws)  # not handed out in stratum order
    assert len({tuple(np.round(d, 12)) for d in draws}) == 10
    with pytest.raises(ValueError, match="n must be"):
        phase_offsets_s(0, 0.02, np.random.default_rng(0))
    with pytest.raises(ValueError, match="period_s"):
        phase_offsets_s(4, 0.0, np.random.default_rng(0))


def test_plan_is_sane() -> None:
    protocol = plan(H100, 20 * MS, target_rel_uncertainty=0.02, repetitions=6, rng=np.random.default_rng(1))
    assert isinstance(protocol, Protocol)
    assert protocol.window_s == min_window_s(H100, 20 * MS, 0.02)
    assert protocol.repetitions == 6 and len(protocol.offsets_s) == 6
    assert all(0 <= o < 0.02 for o in protocol.offsets_s)
    assert sorted(int(o / 0.02 * 6) for o in protocol.offsets_s) == list(range(6))
    assert "lowpass tau 11.5 ms" in protocol.reason and "2.0% needs >= 1.52 s" in protocol.reason
    assert "\n" not in protocol.reason
    slow = plan(Response("boxcar", 1 * MS, 0), 100 * MS, target_rel_uncertainty=0.5, rng=np.random.default_rng(2))
    assert slow.window_s == pytest.approx(0.2) and "floor: 2 sample periods" in slow.reason
    with pytest.raises(ValueError, match="repetitions"):
        plan(H100, 20 * MS, repetitions=0)
