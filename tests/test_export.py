"""Harness API: Measurement.to_json / to_csv, wattscope.to_frame, PowerMeter.live(), a decorated meter shared by
threads (the embedding contract in the README)."""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from pathlib import Path

import pytest

import wattscope
from wattscope import MeasurementError, PowerMeter, _session
from wattscope.testing import SOURCE_AVERAGE, SOURCE_INSTANT, SOURCE_SAMPLES


def _strict_json(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _measure(seconds: float = 0.15, devices: object = 0) -> wattscope.Measurement:
    with PowerMeter(devices, name="step") as m:
        time.sleep(seconds)
    return m.result


def test_to_json_keeps_the_flat_keys_and_is_strict_json(fake, tmp_path: Path) -> None:
    fake.set_trace(0, [0.0, 0.05], [100.0, 300.0], repeat_period_s=0.1)
    r = _measure()
    doc = _strict_json(r.to_json(tmp_path / "m.json"))
    flat = r.to_dict()
    assert {k: doc[k] for k in flat} == flat
    assert doc["uncertainty_reasons"] == list(r.uncertainty_reasons) and doc["errors"] == []
    assert doc["gpu0.energy_j"] == pytest.approx(r.gpus[0].energy_j)
    assert _strict_json((tmp_path / "m.json").read_text()) == doc


def test_to_json_writes_nan_as_null(fake) -> None:
    # Energy counter only: no peak power and no uncertainty (nan).
    for source in (SOURCE_SAMPLES, SOURCE_INSTANT, SOURCE_AVERAGE):
        fake.set_supported(0, source, False)
    _session.reset(energy_period_ns=50_000_000)
    fake.set_trace(0, [0.0], [100.0])
    r = _measure(0.4)
    assert r.gpus[0].source == "energy_counter" and math.isnan(r.peak_power_w)
    doc = _strict_json(r.to_json())
    assert doc["peak_power_w"] is None and doc["gpu0.uncertainty_j"] is None
    assert doc["energy_j"] == pytest.approx(r.energy_j)


def test_to_csv_is_one_row_of_the_flat_keys(fake, tmp_path: Path) -> None:
    fake.set_trace(0, [0.0], [150.0])
    r = _measure()
    text = r.to_csv(tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text() == text
    (row,) = list(csv.DictReader(io.StringIO(text)))
    flat = r.to_dict()
    assert list(row) == list(flat)
    assert float(row["energy_j"]) == pytest.approx(r.energy_j, rel=1e-12)
    assert row["name"] == "step" and row["gpu0.source"] == "samples"
    assert row["counter_energy_j"] == ("" if flat["counter_energy_j"] is None else str(flat["counter_energy_j"]))


def test_to_frame_rows_and_columns(fake) -> None:
    pytest.importorskip("pandas")
    fake.reset(2)
    _session.reset()
    fake.set_trace(0, [0.0], [100.0])
    fake.set_trace(1, [0.0], [40.0])
    both = _measure(0.1, "all")
    one = _measure(0.1, 0)
    df = wattscope.to_frame([both, one])
    assert len(df) == 2
    assert list(df.columns[:len(both.to_dict())]) == list(both.to_dict())
    assert df.loc[0, "gpu1.mean_power_w"] == pytest.approx(40.0)
    assert math.isnan(df.loc[1, "gpu1.energy_j"])  # GPU 1 was not measured by the second window
    assert df["energy_j"].tolist() == pytest.approx([both.energy_j, one.energy_j])


def test_live_follows_the_power(fake) -> None:
    origin_ns = time.monotonic_ns()
    fake.set_trace(0, [0.0, 0.3], [100.0, 300.0], origin_mono_ns=origin_ns)
    meter = PowerMeter(0)
    with pytest.raises(MeasurementError, match="started meter"):
        meter.live()
    with meter:
        time.sleep(0.2)
        (early,) = meter.live()
        time.sleep(0.5)
        (late,) = meter.live()
    assert early.power_w == pytest.approx(100.0) and late.power_w == pytest.approx(300.0)
    assert late.source in ("samples", "instant") and late.cuda_index == 0
    assert 0 <= late.age_s < 0.3  # the instant field is polled every 50 ms, the stream drained every 250 ms
    (after,) = meter.live()  # still answers after stop, from what the thread gathered
    assert after.power_w == pytest.approx(300.0)


def test_live_inside_a_decorated_call(fake) -> None:
    fake.set_trace(0, [0.0], [180.0])
    meter = PowerMeter(0)
    seen = []

    @meter
    def step() -> None:
        time.sleep(0.3)
        seen.append(meter.live()[0].power_w)

    step()
    step()
    assert seen == pytest.approx([180.0, 180.0])


def test_live_without_the_instant_field_reads_the_stream(fake) -> None:
    fake.set_supported(0, SOURCE_INSTANT, False)
    _session.reset()
    fake.set_trace(0, [0.0], [175.0])
    with PowerMeter(0) as meter:
        time.sleep(0.35)
        (reading,) = meter.live()
    assert reading.source == "samples" and reading.power_w == pytest.approx(175.0)


def test_one_decorated_meter_shared_by_threads(fake) -> None:
    fake.set_trace(0, [0.0], [100.0])
    meter = PowerMeter(0, name="step")

    @meter
    def step() -> None:
        time.sleep(0.002)

    threads = [threading.Thread(target=lambda: [step() for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    results = meter.results
    assert len(results) == 100 and len({r.start_ns for r in results}) == 100  # a window per call, none lost
    assert all(r.duration_s >= 0.002 and r.mean_power_w == pytest.approx(100.0) for r in results)
