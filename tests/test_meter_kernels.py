"""PowerMeter(kernels=...) against the fake NVML and the fake CUPTI: the real loaders, sampler thread and tracer."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from wattscope import MeasurementError, PowerMeter, _session
from wattscope.kernel_session import KernelTracingUnavailableError

pd = pytest.importorskip("pandas")

KIND_KERNEL = 10
KIND_MEMCPY = 1
CUPTI_ERROR_INSUFFICIENT_PRIVILEGES = 35
MS = 1_000_000


def _inject(lib, name: bytes | None, start_ns: int, end_ns: int, *, device: int = 0, kind: int = KIND_KERNEL) -> None:
    assert lib.fake_cupti_inject(kind, device, 7, name, start_ns, end_ns, 1) == 1


def _square_wave_with_kernels(fake, lib) -> tuple[PowerMeter, int]:
    """100 W idle / 400 W while "hot" runs, 100 ms each, with "cold" kernels in the idle halves: 3 periods."""
    origin_ns = time.monotonic_ns()
    fake.set_trace(0, [0.0, 0.1], [100.0, 400.0], repeat_period_s=0.2, origin_mono_ns=origin_ns)
    with PowerMeter(0, kernels=True) as m:
        time.sleep(0.65)
        for k in range(3):
            base_ns = origin_ns + 200 * MS * k
            _inject(lib, b"cold", base_ns + 20 * MS, base_ns + 80 * MS)
            _inject(lib, b"hot", base_ns + 100 * MS, base_ns + 200 * MS)
        _inject(lib, None, base_ns + 90 * MS, base_ns + 91 * MS, kind=KIND_MEMCPY)
        _inject(lib, b"other_gpu", base_ns, base_ns + 100 * MS, device=1)
        _inject(lib, b"before", origin_ns - 900 * MS, origin_ns - 800 * MS)  # ends before the window: clipped out
        _inject(lib, b"edge", m._start_ns - 50 * MS, m._start_ns + 30 * MS)
    return m, origin_ns


def test_rows_add_up_to_the_window_energy_and_separate_the_classes(fake, cupti) -> None:
    m, _ = _square_wave_with_kernels(fake, cupti)
    r = m.result
    att = m.kernel_attribution()
    table = m.kernels
    assert att.method == "model"  # the fake is an H100, whose built-in response lets the model run
    assert table["energy_j"].sum() == pytest.approx(r.gpus[0].energy_j, rel=1e-9, abs=1e-9)
    assert att.shift_ns == r.gpus[0].sensor_shift_ns  # integrated as the Measurement was, not re-derived
    rows = table.set_index("name")
    assert "before" not in rows.index and "other_gpu" not in rows.index  # outside the window / another GPU
    assert rows.loc["hot", "calls"] == 3 and rows.loc["cold", "calls"] == 3
    assert rows.loc["hot", "mean_power_w"] > 300.0
    assert rows.loc["cold", "mean_power_w"] < 200.0
    # The model merges classes too short to fit (the clipped edge kernel, the copy) into [other], and says so.
    assert rows.loc["[other]", "calls"] == 2
    assert any("[memcpy], edge" in n for n in table.attrs["notes"])
    assert set(np.unique(att.timeline.device)) == {0}

    overlap = m.kernel_attribution(method="overlap")
    assert overlap.method == "overlap"
    assert sum(row.energy_j for row in overlap.rows) == pytest.approx(r.gpus[0].energy_j, rel=1e-9, abs=1e-9)
    by_name = {row.name: row for row in overlap.rows}
    assert by_name["edge"].time_s == pytest.approx(0.030, abs=0.002)  # the part inside the window only
    assert by_name["[memcpy]"].calls == 1


def test_default_method_falls_back_to_overlap_in_a_window_too_short_to_fit(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True) as m:
        t0_ns = time.monotonic_ns()
        _inject(cupti, b"short", t0_ns, t0_ns + 2 * MS)
        time.sleep(0.004)  # a few ms: no reading lands inside [start + delay + tau, stop + delay]
    att = m.kernel_attribution()
    assert att.method == "overlap"
    assert any("method 'overlap' chosen" in n and "too short" in n for n in att.notes)
    assert m.kernels["energy_j"].sum() == pytest.approx(m.result.energy_j, rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError, match="too short"):  # asked for by name, the model says why it cannot
        m.kernel_attribution(method="model")


def test_save_trace_writes_loadable_json(fake, cupti, tmp_path: Path) -> None:
    m, _ = _square_wave_with_kernels(fake, cupti)
    path = m.save_trace(tmp_path / "trace.json")
    doc = json.loads(Path(path).read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    kernel_names = {e.get("name") for e in events if e.get("ph") == "X"}
    assert {"hot", "cold", "edge"} <= kernel_names
    assert "before" not in kernel_names
    assert any("energy_j" in e.get("args", {}) for e in events if e.get("name") == "hot")


def test_dropped_records_surface(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [200.0])
    _session.current().kernel_tracing().configure(buffer_bytes=1024, buffer_count=1)  # room for 4 records
    with PowerMeter(0, kernels=True) as m:
        time.sleep(0.1)
        now_ns = time.monotonic_ns()
        for i in range(10):
            cupti.fake_cupti_inject(KIND_KERNEL, 0, 1, b"k", now_ns - 50 * MS + i * MS, now_ns - 49 * MS + i * MS, i)
    table = m.kernel_attribution(method="overlap").table  # the model would merge the 1 ms kernels into [other]
    assert table.attrs["dropped"] == 6
    assert any("dropped 6" in n for n in table.attrs["notes"])
    assert table.set_index("name").loc["k", "calls"] == 4


def test_sampler_thread_flushes_so_a_long_window_never_runs_out_of_buffers(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [200.0])
    # Two buffers of 4 records: without a flush between them, 8 records fit and the other 12 would be dropped.
    _session.current().kernel_tracing().configure(buffer_bytes=1024, buffer_count=2)
    with PowerMeter(0, kernels=True) as m:
        for burst in range(5):
            time.sleep(0.35)  # more than the 0.25 s flush period
            now_ns = time.monotonic_ns()
            for i in range(4):
                cupti.fake_cupti_inject(KIND_KERNEL, 0, 1, b"k", now_ns - 20 * MS + i * MS, now_ns - 19 * MS + i * MS,
                                        4 * burst + i)
    table = m.kernel_attribution(method="overlap").table
    assert table.attrs["dropped"] == 0
    assert table.set_index("name").loc["k", "calls"] == 20


def test_missing_cupti_raises_and_auto_falls_back(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTSCOPE_CUPTI_PATH", "/nonexistent/libcupti.so.13")
    fake.set_trace(0, [0.0], [150.0])
    m = PowerMeter(0, kernels=True)
    with pytest.raises(KernelTracingUnavailableError, match="nvidia-cuda-cupti") as info:
        m.start()
    assert "WATTSCOPE_CUPTI_PATH" in str(info.value)
    assert not m.running
    with PowerMeter(0, kernels="auto") as auto:
        time.sleep(0.1)
    r = auto.result
    assert r.energy_j == pytest.approx(150.0 * r.duration_s, rel=1e-6)
    assert any("kernels='auto': energy only" in reason for reason in r.uncertainty_reasons)
    with pytest.raises(MeasurementError, match="no kernel timeline"):
        _ = auto.kernels
    with pytest.raises(ValueError, match="kernels must be"):
        PowerMeter(0, kernels="yes")


def test_cupti_refusing_to_start_is_the_same_typed_error(fake, cupti) -> None:
    cupti.fake_cupti_fail(b"cuptiActivityEnable", 0, CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)
    with pytest.raises(KernelTracingUnavailableError, match="NVreg_RestrictProfilingToAdminUsers"):
        PowerMeter(0, kernels=True).start()


def test_nested_meters_share_one_tracer(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [300.0])
    with PowerMeter(0, kernels=True) as outer:
        time.sleep(0.05)
        with PowerMeter(0, kernels=True) as inner:
            time.sleep(0.1)
            now_ns = time.monotonic_ns()
            _inject(cupti, b"inner_k", now_ns - 60 * MS, now_ns - 20 * MS)
        tracer = _session.current().kernel_tracing()
        assert tracer._users == 1  # the outer meter still holds it
        time.sleep(0.05)
        later_ns = time.monotonic_ns()
        _inject(cupti, b"outer_k", later_ns - 30 * MS, later_ns - 10 * MS)
    assert tracer._users == 0
    # overlap: the model would merge these short classes into [other]
    inner_rows = inner.kernel_attribution(method="overlap").table.set_index("name")
    outer_rows = outer.kernel_attribution(method="overlap").table.set_index("name")
    assert "inner_k" in inner_rows.index and "outer_k" not in inner_rows.index
    assert {"inner_k", "outer_k"} <= set(outer_rows.index)
    assert outer.kernels["energy_j"].sum() == pytest.approx(outer.result.energy_j, rel=1e-9)
    with PowerMeter(0) as plain:
        time.sleep(0.03)
    with pytest.raises(MeasurementError, match="kernels=True"):
        _ = plain.kernels


def test_plot_writes_a_png(fake, cupti, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    m, _ = _square_wave_with_kernels(fake, cupti)
    path = m.plot(tmp_path / "kernels.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_profiler_inside_a_kernel_window_gets_cupti_and_the_window_says_so(fake, cupti) -> None:
    torch = pytest.importorskip("torch")
    fake.set_trace(0, [0.0], [200.0])
    with PowerMeter(0, kernels=True) as m:
        t0 = time.monotonic_ns()
        _inject(cupti, b"before_profiler", t0, t0 + 20 * MS)
        time.sleep(0.05)
        tracing = _session.current().kernel_tracing()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            p0 = time.monotonic_ns()
            assert tracing._active is None  # stepped aside: our callbacks are not CUPTI's while it runs
            time.sleep(0.15)
            p1 = time.monotonic_ns()
        assert tracing._active is not None and len(tracing._segments) == 2  # recording again, a new segment
        t2 = time.monotonic_ns()
        _inject(cupti, b"after_profiler", t2, t2 + 20 * MS)
        time.sleep(0.05)
    rows = m.kernel_attribution(method="overlap").table.set_index("name")
    assert {"before_profiler", "after_profiler", "[untraced]"} <= set(rows.index)
    untraced_s = rows.loc["[untraced]", "time_s"]
    assert (p1 - p0) / 1e9 <= untraced_s <= (p1 - p0) / 1e9 + 0.05
    assert rows["energy_j"].sum() == pytest.approx(m.result.energy_j, rel=1e-9)
    assert any("not traced" in n and "torch.profiler" in n for n in m.kernel_attribution(method="overlap").notes)


def test_kernel_meter_opened_while_torch_profiler_runs_traces_only_after_it(fake, cupti) -> None:
    torch = pytest.importorskip("torch")
    fake.set_trace(0, [0.0], [200.0])
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    prof.__enter__()
    try:
        m = PowerMeter(0, kernels=True).start()
        assert _session.current().kernel_tracing()._active is None  # the profiler keeps CUPTI
        time.sleep(0.1)
    finally:
        prof.__exit__(None, None, None)
    t = time.monotonic_ns()
    _inject(cupti, b"after", t, t + 20 * MS)
    time.sleep(0.05)
    m.stop()
    rows = m.kernel_attribution(method="overlap").table.set_index("name")
    assert {"after", "[untraced]"} <= set(rows.index)
    assert rows.loc["[untraced]", "time_s"] >= 0.1


def test_a_forked_childs_torch_profiler_does_not_touch_the_parents_tracing(fake, cupti) -> None:
    torch = pytest.importorskip("torch")
    fake.set_trace(0, [0.0], [200.0])
    with PowerMeter(0, kernels=True):  # the parent's tracing now listens to torch.profiler
        pid = os.fork()
        if pid == 0:  # the child: its profiler must run without calling into the parent's sampler
            code = 0
            try:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
                    torch.ones(4) + 1
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _session.current().kernel_tracing()._held_by is None  # the parent was not suspended by the child


def test_an_injected_cuda_tool_turns_kernel_tracing_off_with_a_warning(fake, cupti, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_INJECTION64_PATH", "/opt/nsight/libToolsInjection64.so")
    fake.set_trace(0, [0.0], [200.0])
    with pytest.warns(UserWarning, match="Nsight"), PowerMeter(0, kernels=True) as m:
        time.sleep(0.05)
    assert m.result.energy_j > 0
    with pytest.raises(MeasurementError, match="injected"):
        m.kernel_attribution()


def test_a_kernel_meter_keeps_torch_profiler_from_tearing_cupti_down(fake, cupti, monkeypatch) -> None:
    from wattscope import profiler_guard

    fake.set_trace(0, [0.0], [100.0])
    monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    with PowerMeter(0, kernels=True):
        pass
    assert os.environ["TEARDOWN_CUPTI"] == "0"  # as torch.compile sets it for CUDA graphs

    monkeypatch.setenv("TEARDOWN_CUPTI", "1")  # the user's choice is kept, with a warning that says what it risks
    monkeypatch.setattr(profiler_guard, "_warned_teardown", False)
    with pytest.warns(RuntimeWarning, match="TEARDOWN_CUPTI=1"), PowerMeter(0, kernels=True):
        pass
    assert os.environ["TEARDOWN_CUPTI"] == "1"


def test_exit_detaches_cupti_when_a_profiler_session_left_kineto_attached(fake, cupti, monkeypatch) -> None:
    # Kineto's subscriber, left by a session that did not tear CUPTI down, crashed the process at exit on the H100
    # (profiler_guard's docstring): the exit hook detaches CUPTI then, and only then, even after a session reset.
    torch = pytest.importorskip("torch")
    from wattscope import kernel_session, profiler_guard

    fake.set_trace(0, [0.0], [100.0])
    monkeypatch.setattr(profiler_guard, "_left_attached", False)
    monkeypatch.setattr(kernel_session, "_detached", False)
    monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    with PowerMeter(0, kernels=True):
        pass
    _session.current().shutdown()
    assert kernel_session.detach_at_exit() is None  # no profiler session: no subscriber of Kineto's
    assert cupti.fake_cupti_call_count(b"cuptiFinalize") == 0

    with PowerMeter(0, kernels=True), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        pass
    assert profiler_guard.kineto_left_attached()  # TEARDOWN_CUPTI=0 (the meter set it) when the session ended
    _session.reset()  # as test fixtures do: the CUPTI loaded earlier is still the one to detach
    monkeypatch.setattr(profiler_guard, "profiler_active", lambda: True)
    assert kernel_session.detach_at_exit() is None  # a profiler still running keeps CUPTI
    monkeypatch.setattr(profiler_guard, "profiler_active", lambda: False)
    assert kernel_session.detach_at_exit() == 0
    assert kernel_session.detach_at_exit() is None  # once
    assert cupti.fake_cupti_call_count(b"cuptiFinalize") == 1
    assert cupti.fake_cupti_enabled(KIND_KERNEL) == 0
