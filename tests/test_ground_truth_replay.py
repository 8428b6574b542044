"""The per-kernel estimators on real H100 readings: the ground-truth mixes recorded by bench/kernel_ground_truth.py
(bench/data/h100_ground_truth), replayed without a GPU by bench/ground_truth_replay.py; and the parts of the
ground-truth bench that run without a GPU (its raw files, its hot truth)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from wattscope.kernels import KernelTimeline
from wattscope.response import Response

BENCH = Path(__file__).resolve().parents[1] / "bench"
ONE_MS_AND_LONGER = ("1-10ms", "10-50ms", "1-50ms")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def replay():
    return _load("ground_truth_replay")


@pytest.fixture(scope="module")
def bench():
    return _load("kernel_ground_truth")


@pytest.fixture(scope="module")
def mixes(replay):
    found = replay.load_dir(replay.DEFAULT_DIR)
    assert {m.band for m in found} == {"0.1-1ms", "1-10ms", "10-50ms", "0.1-50ms", "1-50ms"}
    return found


def test_model_estimator_meets_the_goal_for_the_gemm_and_the_copy_in_every_band(replay, mixes):
    # The goal: <= 5 % per class with >= 1 s of busy time (each class has ~2.6 s here). The near-idle sleep
    # class is left out: its truth (power alone) is taken 3-8 degC cooler than the mix, and it draws ~0.6 W/degC
    # more when hotter (bench/RESULTS.md, session 6).
    for mix in mixes:
        errors, _ = replay.class_errors(mix, "model")
        for cls in ("gemm", "copy"):
            assert abs(errors[cls]) <= 0.05, (mix.band, cls, errors[cls])


def test_model_estimator_meets_the_goal_for_every_class_against_the_hot_truth(replay):
    # Session 7's mixes (bench/data/h100_ground_truth_hot), whose truth was also measured at the mix's temperature:
    # against it every class, the near-idle sleep included, is within the goal in every band of kernels >= 1 ms.
    hot = replay.load_dir(BENCH / "data" / "h100_ground_truth_hot")
    assert {m.band for m in hot} == set(ONE_MS_AND_LONGER)
    for mix in hot:
        errors, _ = replay.class_errors(mix, "model", hot=True)
        for cls, err in errors.items():
            assert abs(err) <= 0.05, (mix.band, cls, err)


def test_model_estimator_beats_overlap_for_every_class_in_every_band(replay, mixes):
    # Where both are within 1 % (the copy in the long bands) the truth's own closure (+-1 %) cannot rank them.
    for mix in mixes:
        model, _ = replay.class_errors(mix, "model")
        overlap, _ = replay.class_errors(mix, "overlap")
        for cls in model:
            assert abs(model[cls]) < abs(overlap[cls]) or abs(model[cls]) <= 0.01, (mix.band, cls, model[cls],
                                                                                    overlap[cls])


def test_sleep_class_stays_where_the_committed_estimator_put_it(replay, mixes):
    # A regression guard, not the goal: the committed estimator is at +4.7 to +6.5 % for kernels of 1 ms and longer
    # (part of it the truth's temperature bias) and +17.5 % for 0.1-1 ms kernels.
    for mix in mixes:
        errors, _ = replay.class_errors(mix, "model")
        bound = 0.08 if mix.band in ONE_MS_AND_LONGER else 0.25
        assert abs(errors["sleep"]) <= bound, (mix.band, errors["sleep"])


@pytest.mark.parametrize("band", ["1-10ms", "10-50ms", "1-50ms", "0.1-50ms"])
def test_fitted_idle_power_is_physical(replay, mixes, band):
    (mix,) = [m for m in mixes if m.band == band]
    _, att = replay.class_errors(mix, "model")
    assert 50.0 <= att.idle_power_w <= 200.0, att.idle_power_w


@pytest.mark.xfail(strict=True, reason="known: with 0.5 % idle time among 22k sub-ms kernels the fit holds idle at 0 W")
def test_fitted_idle_power_is_physical_with_sub_millisecond_kernels(replay, mixes):
    (mix,) = [m for m in mixes if m.band == "0.1-1ms"]
    _, att = replay.class_errors(mix, "model")
    assert 50.0 <= att.idle_power_w <= 200.0, att.idle_power_w


def test_raw_file_round_trips(replay, tmp_path):
    names = {"gemm": {"gemm_a", "gemm_b"}, "copy": {"[memcpy DtoD]"}, "sleep": {"sleep_kernel"}}
    start = np.array([100, 300, 500, 700], np.int64)
    timeline = KernelTimeline(start, start + 150, np.array(["gemm_a", "[memcpy DtoD]", "sleep_kernel", "gemm_b"],
                                                             dtype=object),
                              np.zeros(4, np.int64), np.zeros(4, np.int64),
                              np.array(["kernel", "memcpy", "kernel", "kernel"], dtype=object))
    t_ns, power_w = np.arange(0, 1000, 20, dtype=np.int64), np.linspace(100.0, 600.0, 50)
    response = Response("lowpass", 12.9e6, 3.85e6)
    alone = {"gemm": 640.0, "copy": 400.0, "sleep": 125.0}
    path = tmp_path / "mix_1-50ms.npz"
    replay.save_raw(str(path), t_ns, power_w, 50, 950, timeline, response, alone, names,
                    {"gemm": 641.0, "copy": 402.0, "sleep": 129.0})
    mix = replay.load_mix(path)
    assert mix.band == "1-50ms" and (mix.start_ns, mix.stop_ns) == (50, 950)
    assert mix.response == response
    np.testing.assert_array_equal(mix.t_ns, t_ns)
    np.testing.assert_array_equal(mix.power_w, power_w)
    np.testing.assert_array_equal(mix.timeline.start_ns, timeline.start_ns)
    np.testing.assert_array_equal(mix.timeline.end_ns, timeline.end_ns)
    assert list(mix.timeline.name) == list(timeline.name) and list(mix.timeline.kind) == list(timeline.kind)
    assert mix.class_names == names and mix.alone_power_w == alone
    assert mix.hot_power_w == {"gemm": 641.0, "copy": 402.0, "sleep": 129.0}
    replay.save_raw(str(path), t_ns, power_w, 50, 950, timeline, response, alone, names, None)
    assert replay.load_mix(path).hot_power_w is None
    with pytest.raises(ValueError, match="without a hot truth"):
        replay.class_errors(replay.load_mix(path), "overlap", hot=True)


def test_hot_truth_measures_each_class_alone_and_its_temperature_inside_the_window(bench):
    launched: list[str] = []

    class Event:
        def record(self) -> None: ...
        def synchronize(self) -> None: ...

    fit = {"icpt_ms": 0.01, "slope_ms": 0.001, "to_size": lambda x: max(1, int(x)), "max": 10**9}
    k = SimpleNamespace(torch=SimpleNamespace(cuda=SimpleNamespace(Event=Event)), fit={c: dict(fit) for c in
                                                                                        bench.CLASSES})
    k.size_for = lambda cls, ms: bench.Kernels.size_for(k, cls, ms)
    k.launch = lambda cls, size: launched.append(cls)
    power_w = {"gemm": 640.0, "copy": 400.0, "sleep": 125.0}

    class Meter:
        def __init__(self, device: int) -> None: ...

        def __enter__(self):
            self.first = len(launched)
            return self

        def __exit__(self, *exc: object) -> None:
            inside = set(launched[self.first:])
            assert len(inside) == 1, inside  # the reheat and the settle ran before the window
            cls = inside.pop()
            self.result = SimpleNamespace(energy_j=power_w[cls] * 0.5, duration_s=0.5, start_ns=1000, stop_ns=2000)
            # Two readings on each side of the window, as the traces give them: not the stretch's temperature.
            t = np.array([800, 900, 1100, 1500, 1900, 2100, 2200])
            self.traces = [SimpleNamespace(series={"temperature": (t, np.array([30, 30, 55, 56, 57, 80, 80.0]))})]

    out = bench.hot_truth(SimpleNamespace(PowerMeter=Meter), k, 0, (1.0, 10.0), rng=random.Random(0), stretches=2,
                          reheat_s=1.5, settle_s=0.15, measure_s=0.5)
    for cls, w in power_w.items():
        assert out[cls]["power_w"] == pytest.approx(w)
        assert out[cls]["s"] == pytest.approx(1.0)
        assert out[cls]["temperature_c_mean"] == pytest.approx(56.0)
    assert {c: launched.count(c) > 0 for c in bench.CLASSES} == dict.fromkeys(bench.CLASSES, True)
