"""The native sampler through its binding (``wattscope._core.Sampler``) against the fake NVML: the energy counter on
request, ring overruns in stats and snapshots, a realtime clock that steps back. PowerMeter-level behaviour is in
test_meter.py; the thread itself is tested natively in csrc/tests/test_sampler.cpp."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from wattscope import _session

MS = 1_000_000
ALL = (-(2**63), 2**63 - 1)
COUNTER = "nvmlDeviceGetTotalEnergyConsumption"


@pytest.fixture
def make_sampler(fake) -> Iterator[Callable[..., Any]]:
    """Samplers of their own over the session's NVML handle, stopped and dropped after the test."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        sampler = _session.core().Sampler(_session.current().nvml(), **options)
        made.append(sampler)
        return sampler

    yield make
    for sampler in made:
        sampler.stop()
    made.clear()


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_request_counter_returns_at_once_and_the_thread_reads(fake, make_sampler):
    sampler = make_sampler(energy_period_ns=60_000 * MS)  # no periodic reading during the test
    slot = sampler.add_device(0)
    sampler.acquire()
    try:
        assert _wait_for(lambda: sampler.stats()["ticks"] >= 1, 1.0)
        time.sleep(0.05)
        fake.set_delay_us(COUNTER, 50_000)  # a 50 ms read, its value taken in the middle
        calls = fake.call_count(COUNTER)
        t_request = time.monotonic_ns()
        sampler.request_counter()
        assert time.monotonic_ns() - t_request < 10 * MS  # the caller never makes the slow call

        def newest_ns() -> int:
            t = sampler.snapshot(slot, *ALL)["energy_counter"]["t_ns"]
            return int(t[-1]) if len(t) else ALL[0]

        assert _wait_for(lambda: newest_ns() >= t_request, 1.0)
        # Read at once, not at the 60 s deadline: stamped ~25 ms after the request.
        assert newest_ns() - t_request < 200 * MS
        assert fake.call_count(COUNTER) == calls + 1
    finally:
        sampler.release()


def test_ring_overruns_in_stats_and_snapshot(fake, make_sampler):
    fake.set_ring_size(0, 3)  # the driver keeps 60 ms and is drained every 250 ms: most samples are lost
    sampler = make_sampler(drain_period_ns=250 * MS, overrun_factor=2.5)
    slot = sampler.add_device(0)
    sampler.acquire()
    try:
        time.sleep(0.8)
        snap = sampler.snapshot(slot, *ALL)
    finally:
        sampler.release()
    assert "gap_from_ns" not in snap  # gaps in a measurement are energy.py's, from the spacing
    assert snap["overruns"] >= 2
    assert len(snap["overrun_from_ns"]) == len(snap["overrun_to_ns"]) == snap["overruns"]
    assert sampler.stats()["overruns"] == snap["overruns"]
    lengths_ns = snap["overrun_to_ns"] - snap["overrun_from_ns"]
    assert np.all(lengths_ns > 50 * MS) and np.all(lengths_ns < 400 * MS)
    t = snap["samples"]["t_ns"]
    assert np.isin(snap["overrun_from_ns"], t).all() and np.isin(snap["overrun_to_ns"], t).all()
    # A range before the first overrun lists none; the device's count stays.
    early = sampler.snapshot(slot, int(t[0]) - 1, int(t[0]))
    assert len(early["overrun_from_ns"]) == 0 and early["overruns"] == snap["overruns"]


def test_overrun_factor_replaces_gap_factor(fake, make_sampler):
    with pytest.raises(TypeError, match="gap_factor"):
        make_sampler(gap_factor=2.5)


def test_realtime_step_back_keeps_the_stream(fake, make_sampler):
    sampler = make_sampler(drain_period_ns=50 * MS, offset_period_ns=50 * MS)
    slot = sampler.add_device(0)
    sampler.acquire()
    try:
        time.sleep(0.3)
        assert sampler.wait_covered(time.monotonic_ns(), 1000 * MS)
        steps = sampler.stats()["clock_steps"]
        t_step = time.monotonic_ns()
        fake.set_realtime_shift_us(-2_010_000)
        time.sleep(0.3)
        # Samples after the step arrive at once, not when realtime has caught up 2 s later.
        assert sampler.wait_covered(t_step + 250 * MS, 300 * MS)
        snap = sampler.snapshot(slot, *ALL)
    finally:
        sampler.release()
    assert sampler.stats()["clock_steps"] >= steps + 1
    spacing_ns = np.diff(snap["samples"]["t_ns"])
    # No repeat, no hole, nothing misplaced: every spacing is the fake's 20 ms.
    assert np.abs(spacing_ns - 20 * MS).max() < 0.1 * MS
    assert snap["overruns"] == 0
    assert snap["samples_total"] == len(snap["samples"]["t_ns"])
