"""Calibration end to end on the fake NVML (a simulated load with a known sensor), and the real load on a GPU."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import HAS_GPU

from wattscope import PowerMeter
from wattscope.calibration import runner
from wattscope.calibration.load import FakeLoad, GpuLoad, LoadError, validate_schedule
from wattscope.measurement import GpuTrace
from wattscope.sensor_profile import load_profile
from wattscope.testing import SOURCE_INSTANT

LOW_W, HIGH_W = 110.0, 430.0


def test_default_plan_meets_the_validation_protocol():
    plan = runner.DEFAULT_PLAN
    in_range = [p for p in plan.periods_ms if 10 <= p <= 100]
    assert len(in_range) >= 6
    # No period that the ~20 ms sample clock would sample at a few phases only.
    assert all(p % 20 != 0 and 20 % p != 0 for p in plan.periods_ms)
    assert plan.passes == 2
    assert plan.passes * plan.pass_s < 60  # the load part of "under 2 minutes per GPU"


def test_plan_lays_out_square_waves_at_random_phases():
    rng = np.random.default_rng(3)
    segments = runner.plan_pass(runner.DEFAULT_PLAN, rng, 10**12)
    assert segments[0].label == "step" and len(segments[0].busy_ns) == 1
    assert sorted(s.period_ms for s in segments[1:]) == sorted(runner.DEFAULT_PLAN.periods_ms)
    phases = []
    for prev, seg in zip(segments[:-1], segments[1:], strict=True):
        assert seg.start_ns == prev.end_ns  # contiguous
        busy = seg.busy_ns
        period_ns = seg.period_ms * 1e6
        assert np.allclose(np.diff(busy[:, 0]), period_ns, atol=1)
        assert np.allclose(busy[:, 1] - busy[:, 0], period_ns / 2, atol=1)
        assert busy[0, 0] >= seg.start_ns + runner.DEFAULT_PLAN.gap_s * 1e9
        assert busy[-1, 1] <= seg.end_ns
        phases.append(busy[0, 0] - seg.start_ns)
    assert len(set(phases)) == len(phases)


def test_energy_counter_becomes_power_between_its_updates():
    # Updates every 100 ms, polled every 50 ms: repeats must not read as zero power.
    t_ns = np.arange(0, 1_000_000_000, 50_000_000, dtype=np.int64)
    power_w = np.where(t_ns < 500_000_000, 100.0, 300.0)
    energy_j = 1000.0 + np.cumsum(power_w * 0.05)
    held = energy_j[(np.arange(t_ns.size) // 2) * 2]  # each value seen twice
    trace = GpuTrace(0, 0, "x", "GPU-x", "1", {"energy_counter": (t_ns, held)})
    t, p = runner.power_series(trace, "energy_counter")
    assert np.all(np.diff(t) == 100_000_000)
    assert set(np.round(p, 6)) == {100.0, 200.0, 300.0}  # the update straddling the change reads between
    assert runner.power_series(trace, "samples") is None


def test_schedules_are_validated():
    now = time.monotonic_ns()
    with pytest.raises(ValueError, match="past"):
        validate_schedule([[now - 10, now + 10]], now + 20, now)
    with pytest.raises(ValueError, match="overlap"):
        validate_schedule([[now + 10, now + 30], [now + 20, now + 40]], now + 50, now)
    with pytest.raises(ValueError, match="end_ns"):
        validate_schedule([[now + 10, now + 30]], now + 20, now)
    assert validate_schedule([now + 10, now + 30], now + 40, now).shape == (1, 2)


def test_fake_load_programs_the_true_power(fake):
    load = FakeLoad(fake, 0, low_w=LOW_W, high_w=HIGH_W)
    a = time.monotonic_ns() + 20_000_000
    busy = np.array([[a, a + 30_000_000], [a + 60_000_000, a + 70_000_000]])
    run = load.run(busy, a + 100_000_000)
    assert time.monotonic_ns() >= a + 100_000_000
    assert run.busy_ns.tolist() == busy.tolist()
    assert fake.energy_j(0, a, a + 100_000_000) == pytest.approx(0.04 * HIGH_W + 0.06 * LOW_W, rel=1e-9)


@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a GPU")
def test_gpu_load_without_a_gpu_says_what_is_missing():
    with pytest.raises(LoadError, match="cuda-bindings|driver|NVRTC|GPU"):
        GpuLoad(0)


def test_calibrate_recovers_the_fake_sensor(fake, tmp_path):
    """The fake's buffered samples are boxcar means over their period, stamped at its end: the fit must find a
    boxcar as wide as the sample period (20 ms by default) with no delay, and the load's levels."""
    fake.set_supported(0, SOURCE_INSTANT, False)
    load = FakeLoad(fake, 0, low_w=LOW_W, high_w=HIGH_W)
    lines: list[str] = []
    report = runner.calibrate(0, load=load, plan=runner.QUICK_PLAN, progress=lines.append, seed=7,
                              directory=tmp_path)
    samples = report.fits["samples"].best
    assert samples.kind == "boxcar"
    assert samples.shape_ns == pytest.approx(20e6, abs=0.5e6)
    assert abs(samples.delay_ns) < 0.5e6
    assert samples.shape_ci_ns < 2e6 and samples.delay_ci_ns < 2e6
    assert samples.low_w == pytest.approx(LOW_W, rel=0.01)
    assert samples.high_w == pytest.approx(HIGH_W, rel=0.01)
    assert samples.rel_residual < 0.01
    assert report.fits["samples"].sample_period_ns == pytest.approx(20e6, rel=0.01)
    assert [a[0] for a in sorted(report.fits["samples"].amplitudes)] == sorted(runner.QUICK_PLAN.periods_ms)
    assert report.skipped["instant"] == "not offered by this GPU or driver"
    assert report.profile.best_source == "samples"
    # The counter accumulates the same true power the samples average. Its update times are known to half a polling
    # period (21.5 ms) at each end: at most ~2 x 21.5 ms x 450 W against the ~3 s pass's ~800 J, i.e. < 3 %.
    assert report.counter_bias_rel is not None and abs(report.counter_bias_rel[0]) < 0.03
    assert any(line.startswith("pass 1/1") for line in lines)
    assert report.profile_path is not None and report.profile_path.startswith(str(tmp_path))
    stored = load_profile(report.profile.gpu_name, report.profile.driver_version, directory=tmp_path)
    assert stored == report.profile
    # The sampler is back on its default cadence, so a meter works as before.
    with PowerMeter(0) as m:
        time.sleep(0.05)
    assert m.result.gpus[0].source == "samples"


def test_cli_calibrate_fake_json_and_plot(fake, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from wattscope.cli import main

    png = tmp_path / "calibration.png"
    code = main(["calibrate", "--fake", "--quick", "--json", "--cache-dir", str(tmp_path / "cache"),
                 "--plot", str(png), "--seed", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    samples = data["profile"]["sources"]["samples"]
    assert samples["model"] == "boxcar"
    assert samples["shape_ns"] == pytest.approx(20e6, abs=0.5e6)
    assert data["profile"]["best_source"] == "samples"
    assert data["profile_path"].startswith(str(tmp_path / "cache"))
    assert data["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pass 1/1" in out.err


@pytest.mark.gpu
def test_gpu_load_draws_more_when_busy(monkeypatch):
    from wattscope import _session

    monkeypatch.delenv("WATTSCOPE_NVML_PATH", raising=False)
    _session.reset()
    with GpuLoad(0) as load:
        alignment = load.align()
        assert alignment.uncertainty_ns < 1_000_000
        start = time.monotonic_ns() + 300_000_000
        busy_ns = np.array([[start, start + 1_000_000_000]])
        with PowerMeter(load.uuid, sync_cuda=False) as meter:
            run = load.run(busy_ns, start + 1_000_000_000)
        assert run.start_ns < start and abs(run.clock_drift_ns) < 1_000_000
    g = meter.result.gpus[0]
    t, p = g.t_ns, g.power_w
    idle_w = np.median(p[(t > meter.result.start_ns) & (t < start)])
    busy_w = np.median(p[(t > start + 200_000_000) & (t < start + 1_000_000_000)])
    assert busy_w > idle_w + 30, (idle_w, busy_w)
    _session.reset()
