"""The sensor model a measurement uses: a calibration profile when one exists, built-in defaults otherwise; and the
raw traces a meter hands out."""

from __future__ import annotations

import time

import numpy as np
import pytest

from wattscope import PowerMeter, sensor
from wattscope.sensor_profile import PROFILE_SCHEMA_VERSION, SensorProfile, SourceCalibration, save_profile

FAKE_NAME = "Fake NVIDIA H100 80GB HBM3"
FAKE_DRIVER = "999.99.99-fake"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTSCOPE_CACHE_DIR", str(tmp_path))
    sensor.forget_profiles()
    yield tmp_path
    sensor.forget_profiles()


def _profile(delay_ns: float, width_ns: float = 20e6) -> SensorProfile:
    cal = SourceCalibration(
        source="samples", model="boxcar", shape_ns=width_ns, delay_ns=delay_ns, shape_ci_ns=1e5, delay_ci_ns=1e5,
        low_w=100.0, high_w=400.0, rel_residual=0.01, sample_period_ns=20e6, coverage=1.0, aliasing_periods_ms=(),
        amplitudes=(), rise_10_90_ns=None, first_change_delay_ns=None,
    )
    return SensorProfile(
        schema_version=PROFILE_SCHEMA_VERSION, gpu_name=FAKE_NAME, gpu_uuid="GPU-x", driver_version=FAKE_DRIVER,
        created_utc="2026-11-24T00:00:00Z", wattscope_version="test", calibration_s=1.0, sources={"samples": cal},
        best_source="samples", counter_bias_rel=None,
    )


def test_defaults_by_family():
    h100 = sensor.default_sensor_model("NVIDIA H100 80GB HBM3")
    assert h100.response is not None and h100.response.kind == "lowpass"
    assert h100.memory_ns == 12_900_000
    # A 20 ms reading of a 12.9 ms low-pass delayed 3.85 ms is centred 16.75 ms back, the interval's centre 10 ms back.
    assert h100.shift_ns(20e6) == 6_750_000
    other = sensor.default_sensor_model("Tesla T4")
    assert other.response is None and other.shift_ns(20e6) == 0 and "calibrate" in other.origin


def test_boxcar_of_one_period_without_delay_needs_no_shift(cache):
    save_profile(_profile(delay_ns=0.0), cache)
    model = sensor.sensor_model(FAKE_NAME, FAKE_DRIVER)
    assert model.profile_path is not None and model.shift_ns(20e6) == 0
    assert "calibrated" in model.origin


def test_profile_of_another_driver_is_not_used(cache):
    save_profile(_profile(delay_ns=0.0), cache)
    assert sensor.sensor_model(FAKE_NAME, "1.0").profile_path is None


def test_measurement_aligns_readings_by_the_profiles_delay(fake, cache):
    """A profile that says readings lag by 100 ms makes the estimate that of the window 100 ms later in the trace.
    The fake has no lag, so that is what a correct shift must produce, and a step inside the window makes the two
    windows' energies differ by more than the estimator's edge error."""
    save_profile(_profile(delay_ns=100e6), cache)
    fake.set_trace(0, [0.0, 0.15], [100.0, 500.0], origin_mono_ns=time.monotonic_ns())
    with PowerMeter(0) as m:
        time.sleep(0.5)
    r = m.result
    g = r.gpus[0]
    assert g.sensor_shift_ns == 100_000_000
    assert g.sensor_profile is not None and g.sensor_profile.endswith(".json")
    shifted = fake.energy_j(0, r.start_ns + 100_000_000, r.stop_ns + 100_000_000)
    unshifted = fake.energy_j(0, r.start_ns, r.stop_ns)
    bound = 2 * 0.02 * 400.0  # one sample period of the full step at each edge
    assert abs(shifted - unshifted) > 2 * bound
    assert abs(g.energy_j - shifted) <= bound


def test_corrupt_profile_falls_back_to_defaults(fake, cache):
    path = save_profile(_profile(delay_ns=0.0), cache)
    path.write_text("{not json")
    fake.set_trace(0, [0.0], [200.0])
    with pytest.warns(UserWarning):
        with PowerMeter(0) as m:
            time.sleep(0.1)
        g = m.result.gpus[0]
    assert g.sensor_profile is None and "built-in default" in g.sensor_model
    assert g.energy_j == pytest.approx(200.0 * m.result.duration_s, rel=1e-6)


def test_traces_hold_every_source_in_si_units(fake):
    fake.set_trace(0, [0.0], [250.0])
    with PowerMeter(0) as m:
        time.sleep(0.3)
    (trace,) = m.traces
    assert trace.driver_version == FAKE_DRIVER and trace.name == FAKE_NAME
    t, p = trace.series["samples"]
    assert len(t) >= 10 and np.allclose(p, 250.0)
    assert np.all(np.diff(t) > 0)
    tc, e = trace.series["energy_counter"]
    assert len(tc) >= 2 and np.all(np.diff(e) >= 0)  # cumulative J
    # The counter's increase over its readings is 250 W times the time between them, within one update.
    assert (e[-1] - e[0]) == pytest.approx(250.0 * (tc[-1] - tc[0]) / 1e9, abs=250.0 * 0.11)
    assert set(trace.series) >= {"samples", "instant", "average", "energy_counter"}


def test_traces_before_the_window_closes_raise(fake):
    m = PowerMeter(0).start()
    try:
        with pytest.raises(Exception, match="still running"):
            _ = m.traces
    finally:
        m.stop()


def test_polled_fields_are_shifted_by_the_whole_group_delay():
    """A polled reading lags its value's change by half a polling period on average, which cancels the half period
    the estimator puts its interval centre before the stamp: the shift is the response's group delay."""
    from wattscope.response import Response

    model = sensor.SensorModel(Response("boxcar", 25e6, 5e6), "test", None, None)
    assert model.shift_ns(50e6, polled=True) == 17_500_000
    assert model.shift_ns(50e6) == 17_500_000 - 25_000_000
