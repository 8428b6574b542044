"""PowerMeter against the fake NVML: the real loader, sampler thread and bindings, a known power trace."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
from conftest import _ignore_torch_devices

import wattscope
from wattscope import MeasurementError, MeasurementWarning, PowerMeter


def _truth(fake, r, dev=0):
    return fake.energy_j(dev, r.start_ns, r.stop_ns)


def _assert_matches(fake, r, dev=0, g=0):
    """The estimate agrees with the analytic integral within the estimator's edge bound: one sensor period of the
    largest power step at each edge (the estimator assumes power uniform inside a sample's interval)."""
    truth = _truth(fake, r, dev)
    gpu = r.gpus[g]
    period_s = gpu.sample_period_s or 0.02
    bound = 2 * period_s * (np.max(gpu.power_w) - np.min(gpu.power_w)) + 1e-6 * truth
    assert abs(gpu.energy_j - truth) <= bound, (gpu.energy_j, truth, bound)


def test_constant_power_integrates_exactly(fake):
    fake.set_trace(0, [0.0], [250.0])
    with PowerMeter(0) as m:
        time.sleep(0.3)
    r = m.result
    assert r.gpus[0].source == "samples"
    assert r.energy_j == pytest.approx(250.0 * r.duration_s, rel=1e-6)
    assert r.coverage == 1.0
    assert r.gaps == 0
    assert r.gpus[0].uncertainty_j == pytest.approx(0.0, abs=1e-9)
    assert r.mean_power_w == pytest.approx(250.0, rel=1e-6)


def test_square_wave_matches_the_analytic_integral(fake):
    fake.set_trace(0, [0.0, 0.05, 0.13], [120.0, 650.0, 300.0], repeat_period_s=0.21)
    with PowerMeter(0) as m:
        time.sleep(0.6)
    r = m.result
    _assert_matches(fake, r)
    assert r.gpus[0].peak_power_w <= 650.0 + 1e-3
    assert r.gpus[0].n_samples >= 25


def test_window_aligned_to_samples_is_exact(fake):
    """Edges on sample stamps leave nothing to the uniformity assumption: the boxcar samples integrate exactly."""
    fake.set_trace(0, [0.0, 0.037], [80.0, 420.0], repeat_period_s=0.09)
    with PowerMeter(0) as m:
        time.sleep(0.4)
    r = m.result
    t = r.gpus[0].t_ns
    inside = t[(t > r.start_ns) & (t < r.stop_ns)]
    a, b = int(inside[1]), int(inside[-2])
    from wattscope.energy import integrate_window

    we = integrate_window(t, r.gpus[0].power_w, a, b)
    assert we.energy_j == pytest.approx(fake.energy_j(0, a, b), rel=1e-5)


def test_raw_samples_are_numpy_arrays(fake):
    with PowerMeter(0) as m:
        time.sleep(0.1)
    g = m.result.gpus[0]
    assert isinstance(g.t_ns, np.ndarray) and g.t_ns.dtype == np.int64
    assert isinstance(g.power_w, np.ndarray) and g.power_w.dtype == np.float64
    assert np.all(np.diff(g.t_ns) > 0)
    assert g.t_ns.base is not None  # a view on memory the native side handed over, not a Python list


def test_energy_counter_cross_check(fake):
    fake.set_trace(0, [0.0, 0.4], [200.0, 500.0], repeat_period_s=0.8)
    with PowerMeter(0) as m:
        time.sleep(1.0)
    r = m.result
    g = r.gpus[0]
    assert g.counter_energy_j is not None
    # The counter updates every 100 ms: it agrees within ~ one update of the largest power.
    assert g.counter_energy_j == pytest.approx(_truth(fake, r), abs=0.1 * 500.0)


def test_short_window_says_so(fake):
    with PowerMeter(0) as m:
        time.sleep(0.005)
    r = m.result
    assert any("shorter than 2 sensor periods" in s for s in r.uncertainty_reasons)


def test_gaps_are_detected_and_reported(fake):
    # A ring of 3 samples (60 ms) drained every 250 ms loses most samples: the gaps must be reported, not hidden.
    wattscope.configure_sampler(drain_period_ns=250_000_000, linger_ns=500_000_000, energy_period_ns=100_000_000)
    fake.set_ring_size(0, 3)
    fake.set_trace(0, [0.0, 0.11], [300.0, 500.0], repeat_period_s=0.23)
    with PowerMeter(0) as m:
        time.sleep(1.0)
    r = m.result
    assert r.gaps >= 2
    assert r.coverage < 0.6
    assert r.gpus[0].gap_s > 0.3
    # Filled gaps are an estimate; its error is what the uncertainty is for.
    assert r.uncertainty_j > 0
    assert abs(r.energy_j - _truth(fake, r)) <= 3 * r.uncertainty_j


def test_no_gaps_at_default_cadence(fake):
    with PowerMeter(0) as m:
        time.sleep(1.0)
    assert m.result.gaps == 0
    assert m.result.coverage == 1.0


@pytest.mark.parametrize(
    ("unsupported", "expected"),
    [((0,), "instant"), ((0, 1), "average"), ((0, 1, 2), "energy_counter")],
)
def test_unsupported_sources_fall_back(fake, unsupported, expected):
    for source in unsupported:
        fake.set_supported(0, source, False)
    wattscope.configure_sampler(linger_ns=500_000_000, energy_period_ns=100_000_000)
    fake.set_trace(0, [0.0], [180.0])
    with PowerMeter(0) as m:
        time.sleep(0.5)
    g = m.result.gpus[0]
    assert g.source == expected
    assert any(expected in r for r in g.uncertainty_reasons)
    assert g.energy_j == pytest.approx(180.0 * m.result.duration_s, rel=0.25)


def test_no_power_source_at_all_is_a_clear_error(fake):
    for source in range(4):
        fake.set_supported(0, source, False)
    wattscope.configure_sampler()
    with pytest.raises(wattscope.NotSupportedError, match="no power reading"):
        PowerMeter(0).start()


def test_gpu_lost_mid_run_keeps_samples_and_reports(fake):
    fake.set_trace(0, [0.0], [400.0])
    meter = PowerMeter(0)
    meter.start()
    time.sleep(0.3)
    assert wattscope._session.current().sampler().wait_covered(time.monotonic_ns(), 1_000_000_000)  # drained first
    fake.fail("*", 0, 0, wattscope.testing.GPU_IS_LOST)
    time.sleep(0.3)
    meter.stop()
    with pytest.warns(MeasurementWarning, match="GPU is lost"):
        r = meter.result
    assert r.errors and "code 15" in r.errors[0]
    assert r.gpus[0].n_samples >= 10  # what was taken before the loss is kept
    assert r.coverage < 0.75


def test_gpu_lost_strict_raises_with_the_partial_result(fake):
    meter = PowerMeter(0, strict=True)
    meter.start()
    time.sleep(0.2)
    # Drained before the loss (the next periodic drain is 250 ms after the start): samples still in the driver's ring
    # when the GPU goes are lost with it.
    assert wattscope._session.current().sampler().wait_covered(time.monotonic_ns(), 1_000_000_000)
    fake.fail("*", 0, 0, wattscope.testing.GPU_IS_LOST)
    time.sleep(0.1)
    meter.stop()
    with pytest.raises(wattscope.GpuLostError) as info:
        _ = meter.result
    assert info.value.measurement.gpus[0].n_samples > 0


def test_bad_device_index_lists_the_gpus(fake):
    with pytest.raises(ValueError, match="GPUs on this machine") as info:
        PowerMeter(7).start()
    assert "cuda:0" in str(info.value)
    with pytest.raises(wattscope.DeviceNotFoundError):
        PowerMeter("GPU-does-not-exist").start()


def test_misuse_is_a_clear_error(fake):
    m = PowerMeter(0)
    with pytest.raises(MeasurementError, match="nothing measured"):
        _ = m.result
    with pytest.raises(MeasurementError):
        m.stop()
    m.start()
    with pytest.raises(MeasurementError, match="twice"):
        m.start()
    with pytest.raises(MeasurementError, match="still running"):
        _ = m.result
    m.stop()
    with pytest.raises(ValueError):
        PowerMeter(wait_timeout_s=-1)


def test_nested_meters(fake):
    fake.set_trace(0, [0.0, 0.1], [150.0, 450.0], repeat_period_s=0.25)
    with PowerMeter(0) as outer:
        time.sleep(0.1)
        with PowerMeter(0) as inner:
            time.sleep(0.3)
        time.sleep(0.1)
    _assert_matches(fake, outer.result)
    _assert_matches(fake, inner.result)
    assert inner.result.energy_j < outer.result.energy_j


def test_phases_are_windows_of_their_own_summed_by_name(fake):
    pd = pytest.importorskip("pandas")
    fake.set_trace(0, [0.0, 0.1], [150.0, 450.0], repeat_period_s=0.25)
    with PowerMeter(0) as m:
        with m.phase("load"):
            time.sleep(0.2)
        with m.phase("step"):
            time.sleep(0.15)
            with m.phase("inner"):  # nested: counted in full, inside "step" too
                time.sleep(0.1)
        with m.phase("load"):
            time.sleep(0.1)
    table = m.phases
    assert isinstance(table, pd.DataFrame)
    rows = table.set_index("name")
    assert list(rows["calls"].loc[["load", "step", "inner"]]) == [2, 1, 1]
    windows = {w.name: [] for w in m._phases}
    for w in m._phases:
        _assert_matches(fake, w.result)  # each phase integrates its own stretch of the trace
        windows[w.name].append(w.result)
    for name, results in windows.items():
        assert rows.loc[name, "energy_j"] == pytest.approx(sum(r.energy_j for r in results), rel=1e-12)
        assert rows.loc[name, "time_s"] == pytest.approx(sum(r.duration_s for r in results), rel=1e-12)
        assert rows.loc[name, "share"] == pytest.approx(rows.loc[name, "energy_j"] / m.result.energy_j, rel=1e-12)
    assert rows.loc["step", "energy_j"] > rows.loc["inner", "energy_j"]
    assert rows["energy_j"].sum() - rows.loc["inner", "energy_j"] <= m.result.energy_j  # phases lie inside the window


def test_phase_needs_a_running_meter(fake):
    m = PowerMeter(0)
    with pytest.raises(MeasurementError, match="running meter"), m.phase("x"):
        pass
    with m:
        pass
    with pytest.raises(MeasurementError, match="running meter"), m.phase("x"):
        pass
    assert len(m.phases) == 0


def test_concurrent_meters_in_threads(fake):
    fake.set_trace(0, [0.0, 0.07], [100.0, 500.0], repeat_period_s=0.17)
    results = {}

    def work(k: int) -> None:
        time.sleep(0.01 * k)
        with PowerMeter(0) as m:
            time.sleep(0.2 + 0.05 * k)
        results[k] = m.result

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == 6
    for r in results.values():
        _assert_matches(fake, r)


def test_decorator_measures_every_call(fake):
    meter = PowerMeter(0)

    @meter
    def step(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    assert step(0.05) == "done"
    step(0.1)
    assert len(meter.results) == 2
    assert meter.results[1].duration_s > meter.results[0].duration_s
    assert meter.result is meter.results[-1]
    assert meter.results[0].name.endswith("step")


def test_exception_inside_the_block_still_closes_the_window(fake):
    m = PowerMeter(0)
    with pytest.raises(KeyboardInterrupt), m:
        time.sleep(0.05)
        raise KeyboardInterrupt
    assert not m.running
    assert m.result.duration_s > 0.04


def test_two_gpus_each_integrated(monkeypatch):
    from wattscope import _session
    from wattscope.testing import FakeNvml

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _ignore_torch_devices(monkeypatch)
    fake = FakeNvml.install(2, linger_ns=500_000_000)
    try:
        fake.set_trace(0, [0.0, 0.1], [100.0, 600.0], repeat_period_s=0.3)
        fake.set_trace(1, [0.0], [75.0])
        with PowerMeter("all") as m:
            time.sleep(0.5)
        r = m.result
        assert [g.cuda_index for g in r.gpus] == [0, 1]
        _assert_matches(fake, r, dev=0, g=0)
        assert r.gpus[1].energy_j == pytest.approx(75.0 * r.duration_s, rel=1e-6)
        assert r.energy_j == pytest.approx(r.gpus[0].energy_j + r.gpus[1].energy_j)
        d = r.to_dict()
        assert d["gpu1.energy_j"] == r.gpus[1].energy_j and "gpu0.uncertainty_j" in d
    finally:
        _session.reset()
        fake.reset(1)


def test_measurement_summary_is_readable(fake):
    with PowerMeter(0, name="region") as m:
        time.sleep(0.05)
    text = str(m.result)
    assert text.startswith("region: ") and " J ± " in text and "cuda:0" in text


def test_sampler_thread_stops_after_linger(fake):
    from wattscope import _session

    with PowerMeter(0) as m:
        time.sleep(0.05)
    _ = m.result
    sampler = _session.current().sampler()
    deadline = time.monotonic() + 5
    while sampler.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sampler.stats()["running"]
    # And it starts again, continuing the same timeline.
    with PowerMeter(0) as m2:
        time.sleep(0.1)
    assert m2.result.coverage == 1.0
    assert sampler.stats()["threads_started"] >= 2


def test_session_shutdown_balances_nvml_init(fake):
    import gc

    from wattscope import _session

    gc.collect()
    # The fixture's session has initialised NVML once already; meters share that one reference.
    held = fake.init_refcount()
    assert held >= 1
    with PowerMeter(0) as m, PowerMeter(0) as m2:
        time.sleep(0.02)
    _ = m.result, m2.result
    assert fake.init_refcount() == held
    _session.reset()
    del m, m2
    gc.collect()
    assert fake.init_refcount() == held - 1


def test_warnings_are_not_raised_for_a_clean_measurement(fake):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with PowerMeter(0) as m:
            time.sleep(0.1)
        _ = m.result


def test_gpu_lost_before_any_reading_of_the_window_warns_with_nan(fake):
    """The ring is drained every 250 ms: a GPU lost right after start takes the window's readings with it."""
    fake.set_trace(0, [0.0], [200.0])
    with PowerMeter(0) as warm:  # readings before the window exist, so only the window itself is uncovered
        time.sleep(0.3)
    _ = warm.result
    meter = PowerMeter(0).start()
    fake.fail("*", 0, 0, wattscope.testing.GPU_IS_LOST)
    time.sleep(0.3)
    meter.stop()
    with pytest.warns(MeasurementWarning, match="lost|GPU"):
        r = meter.result
    assert r.errors and np.isnan(r.energy_j) and r.coverage == 0.0


def test_short_windows_do_not_flood_the_counter(fake):
    """Each window edge asks for a counter reading (~4 ms on H100), but at most once per ~100 ms counter update."""
    meter = PowerMeter(0)

    @meter
    def tiny() -> None:
        pass

    before = fake.call_count("nvmlDeviceGetTotalEnergyConsumption")
    t0 = time.monotonic()
    for _ in range(300):
        tiny()
    elapsed_s = time.monotonic() - t0
    time.sleep(0.05)
    reads = fake.call_count("nvmlDeviceGetTotalEnergyConsumption") - before
    # One request per 100 ms, plus the fixture's 100 ms periodic poll, plus slack for a read in flight.
    assert reads <= 2 * (elapsed_s / 0.1 + 1) + 2, (reads, elapsed_s)
