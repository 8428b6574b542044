"""User ranges (ranges.py): torch.cuda.nvtx ranges and m.phase inside PowerMeter(kernels=True, ranges=True), against
the fake NVML and the fake CUPTI (which writes CUPTI's external correlation records for the injecting thread)."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from wattscope import MeasurementError, PowerMeter, _session
from wattscope import ranges as ranges_module
from wattscope.ranges import NO_RANGE, _thread_stack, range_ids

pd = pytest.importorskip("pandas")

KIND_KERNEL = 10
CUSTOM2 = 5
MS = 1_000_000
_correlation = itertools.count(1)


def _inject(lib, name: bytes, start_ns: int, end_ns: int) -> int:
    corr = next(_correlation)
    assert lib.fake_cupti_inject(KIND_KERNEL, 0, 7, name, start_ns, end_ns, corr) == 1
    return corr


def _ranges(m: PowerMeter):
    return m.range_attribution(method="overlap").set_index("range")


def test_range_ids_match_pairs_by_correlation_and_leave_the_rest_out():
    corr = np.array([5, 1, 9, 3], dtype=np.uint32)
    pairs_c = np.array([3, 5, 5], dtype=np.uint32)  # 5 twice: a runtime and a driver record of one launch
    pairs_r = np.array([30, 50, 50], dtype=np.uint64)
    assert range_ids(corr, pairs_c, pairs_r).tolist() == [50, -1, -1, 30]
    assert range_ids(corr, np.zeros(0, np.uint32), np.zeros(0, np.uint64)).tolist() == [-1] * 4


def test_nested_ranges_get_their_kernels_energy_and_the_rows_add_up(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        t0 = time.monotonic_ns()
        _inject(cupti, b"warmup", t0, t0 + 20 * MS)
        for step in range(2):
            base = t0 + (30 + 100 * step) * MS
            with ranges.entered("step"):
                _inject(cupti, b"gemm", base, base + 40 * MS)
                with ranges.entered("attention"):
                    _inject(cupti, b"softmax", base + 40 * MS, base + 60 * MS)
                    _inject(cupti, b"gemm", base + 60 * MS, base + 70 * MS)
        time.sleep(0.3)
    table = _ranges(m)
    assert list(table.index[:2]) == ["step", "step / attention"]
    assert table.loc["step", "calls"] == 2 and table.loc["step", "kernels"] == 6
    assert table.loc["step / attention", "calls"] == 2 and table.loc["step / attention", "kernels"] == 4
    assert table.loc["step / attention", "depth"] == 1
    assert table.loc["step", "time_s"] == pytest.approx(0.140, abs=1e-6)
    assert table.loc["step / attention", "time_s"] == pytest.approx(0.060, abs=1e-6)
    assert table.loc[NO_RANGE, "kernels"] == 1 and table.loc[NO_RANGE, "time_s"] == pytest.approx(0.020, abs=1e-6)
    # A flat 100 W: every kernel second is worth 100 J whatever the split, so the energies are exact.
    assert table.loc["step", "energy_j"] == pytest.approx(14.0, rel=0.02)
    assert table.loc["step / attention", "energy_j"] == pytest.approx(6.0, rel=0.02)
    top = table[table["depth"] == 0]
    assert top["energy_j"].sum() == pytest.approx(m.result.energy_j, rel=1e-9)
    # The kernel view is unchanged by ranges.
    assert m.kernel_attribution(method="overlap").table["energy_j"].sum() == pytest.approx(m.result.energy_j, rel=1e-9)


def test_uncertainty_is_the_ranges_share_of_its_classes(fake, cupti) -> None:
    origin_ns = time.monotonic_ns()
    fake.set_trace(0, [0.0, 0.1], [100.0, 400.0], repeat_period_s=0.2, origin_mono_ns=origin_ns)
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        time.sleep(0.65)
        for k in range(3):
            base = origin_ns + 200 * MS * k
            with ranges.entered("cold" if k else "first"):
                _inject(cupti, b"cold", base + 20 * MS, base + 80 * MS)
            with ranges.entered("hot"):
                _inject(cupti, b"hot", base + 100 * MS, base + 200 * MS)
    att = m.kernel_attribution()
    rows = {r.name: r for r in att.rows}
    table = m.ranges.set_index("range")
    assert table.loc["hot", "energy_j"] == pytest.approx(rows["hot"].energy_j, rel=1e-9)
    assert table.loc["hot", "uncertainty_j"] == pytest.approx(rows["hot"].uncertainty_j, rel=1e-9)
    cold_j = table.loc["cold", "energy_j"] + table.loc["first", "energy_j"]
    assert cold_j == pytest.approx(rows["cold"].energy_j, rel=1e-9)
    assert rows["cold"].uncertainty_j > 0
    # Two of the three cold calls: their share of the class's energy, times the class's uncertainty (one fitted
    # power, shared linearly, not in quadrature: that would give sqrt(2)/3 of it instead of about 2/3).
    share = table.loc["cold", "energy_j"] / rows["cold"].energy_j
    assert share == pytest.approx(2 / 3, abs=0.05)
    assert table.loc["cold", "uncertainty_j"] == pytest.approx(rows["cold"].uncertainty_j * share, rel=1e-9)


def test_torch_nvtx_ranges_and_phases_are_ranges(fake, cupti, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    calls = []
    # The CPU build of torch has no NVTX: stand-ins record that the originals still run, in order.
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: calls.append(("push", msg)) or 0)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)) or 0)
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        t0 = time.monotonic_ns()
        with torch.cuda.nvtx.range("forward {}", 1):
            _inject(cupti, b"conv", t0, t0 + 30 * MS)
            with m.phase("head"):
                _inject(cupti, b"linear", t0 + 30 * MS, t0 + 40 * MS)
        torch.cuda.nvtx.range_push("loss")
        _inject(cupti, b"loss", t0 + 40 * MS, t0 + 45 * MS)
        torch.cuda.nvtx.range_pop()
        time.sleep(0.1)
    assert calls == [("push", "forward 1"), ("pop",), ("push", "loss"), ("pop",)]
    table = _ranges(m)
    assert table.loc["forward 1", "kernels"] == 2
    assert table.loc["forward 1 / head", "kernels"] == 1
    assert table.loc["loss", "kernels"] == 1
    assert m.phases.set_index("name").loc["head", "calls"] == 1  # still a synchronised window of its own
    assert cupti.fake_cupti_external_depth(CUSTOM2) == 0  # every push popped


def test_ranges_of_another_thread_stay_with_that_thread(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        t0 = time.monotonic_ns()

        def worker() -> None:
            with ranges.entered("worker"):
                _inject(cupti, b"w", t0, t0 + 10 * MS)

        with ranges.entered("main"):
            th = threading.Thread(target=worker)
            th.start()
            th.join()
            _inject(cupti, b"m", t0 + 10 * MS, t0 + 20 * MS)
        time.sleep(0.05)
    table = _ranges(m)
    assert table.loc["main", "kernels"] == 1 and table.loc["worker", "kernels"] == 1
    assert "main / worker" not in table.index


def test_a_meter_opened_inside_a_range_sees_it(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [100.0])
    ranges = _session.current().kernel_tracing().ranges
    with ranges.entered("epoch"):  # no tracer yet: kept on the thread's stack only
        assert cupti.fake_cupti_external_depth(CUSTOM2) == 0
        with PowerMeter(0, kernels=True, ranges=True) as m:
            assert cupti.fake_cupti_external_depth(CUSTOM2) == 1
            t0 = time.monotonic_ns()
            _inject(cupti, b"k", t0, t0 + 10 * MS)
            time.sleep(0.05)
        assert cupti.fake_cupti_external_depth(CUSTOM2) == 0  # popped when tracing stopped
    assert _ranges(m).loc["epoch", "kernels"] == 1


def test_torch_profiler_takes_cupti_with_none_of_our_ids_pushed(fake, cupti) -> None:
    torch = pytest.importorskip("torch")
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        with ranges.entered("train"):
            assert cupti.fake_cupti_external_depth(CUSTOM2) == 1
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
                # Kineto warns about every record of an external kind it does not know: none of ours while it runs.
                assert cupti.fake_cupti_external_depth(CUSTOM2) == 0
            assert cupti.fake_cupti_external_depth(CUSTOM2) == 1  # pushed again when tracing resumed
            t0 = time.monotonic_ns()
            _inject(cupti, b"after", t0, t0 + 10 * MS)
        time.sleep(0.05)
    assert _ranges(m).loc["train", "kernels"] == 1


def test_bad_use_gets_a_clear_error(fake, cupti) -> None:
    with pytest.raises(ValueError, match="ranges=True needs kernel tracing"):
        PowerMeter(0, ranges=True)
    with pytest.raises(ValueError, match="ranges must be True or False"):
        PowerMeter(0, kernels=True, ranges="yes")
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True) as m:
        time.sleep(0.02)
    with pytest.raises(MeasurementError, match="ranges=True"):
        _ = m.ranges
    # The first kernel meter of a tracing run decides: an inner meter asking for ranges is told why it has none.
    with PowerMeter(0, kernels=True), PowerMeter(0, kernels=True, ranges=True) as inner:
        time.sleep(0.02)
    with pytest.raises(MeasurementError, match="outermost"):
        _ = inner.ranges


def test_pairs_of_calls_that_launch_nothing_fill_their_own_capacity_with_a_note(fake, cupti) -> None:
    # CUPTI pairs every API call inside a range, not only launches (cudaGetLastError follows each of torch's): past
    # the pair capacity the later kernels are [no range], with a note, and no record counts as dropped.
    _session.current().kernel_tracing().configure(range_pair_capacity=100)
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        t0 = time.monotonic_ns()
        with ranges.entered("step"):
            for k in range(40):
                _inject(cupti, b"k", t0 + k * MS, t0 + k * MS + MS // 2)
                for _ in range(2):  # two more pairs per launch
                    assert cupti.fake_cupti_api_call(next(_correlation)) == 1
        time.sleep(0.05)
    table = m.range_attribution(method="overlap")
    rows = table.set_index("range")
    assert rows.loc["step", "kernels"] == 34  # pairs 1, 4, ..., 100 are launches: 34 of them fit
    assert rows.loc[NO_RANGE, "kernels"] == 6
    assert any("capacity" in n and "lost 20" in n for n in table.attrs["notes"])
    assert m.kernel_attribution(method="overlap").dropped == 0


def test_another_threads_open_range_leaves_cupti_when_tracing_stops_and_returns_when_it_starts(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [100.0])
    ranges = _session.current().kernel_tracing().ranges
    go, done = threading.Event(), threading.Event()
    depths: list[int] = []

    def worker() -> None:
        with ranges.entered("epoch"):  # open across both meters
            go.wait()
            with ranges.entered("batch"):  # its first push after the first meter started
                depths.append(cupti.fake_cupti_external_depth(CUSTOM2))
                now = time.monotonic_ns()
                _inject(cupti, b"w", now, now + 10 * MS)
            done.set()
            go2.wait()
            with ranges.entered("batch"):  # after the meter stopped: ours taken off CUPTI's stack first
                depths.append(cupti.fake_cupti_external_depth(CUSTOM2))

    go2 = threading.Event()
    th = threading.Thread(target=worker)
    th.start()
    with PowerMeter(0, kernels=True, ranges=True) as m:
        go.set()
        done.wait(5)
        time.sleep(0.05)
    go2.set()
    th.join(5)
    assert depths == [2, 0]  # epoch and batch pushed while tracing; nothing of ours after it stopped
    table = _ranges(m)
    assert table.loc["epoch / batch", "kernels"] == 1 and table.loc["epoch", "depth"] == 0


def test_ids_never_repeat_across_sessions(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True):
        first = _session.current().kernel_tracing().ranges
        with first.entered("old"):
            first_id = _thread_stack()[-1][0]
    _session.reset()
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        second = _session.current().kernel_tracing().ranges
        assert second is not first
        with second.entered("new"):
            t0 = time.monotonic_ns()
            _inject(cupti, b"k", t0, t0 + 10 * MS)
        time.sleep(0.05)
    ids = [rid for rid in m.kernel_attribution(method="overlap").timeline.range_id.tolist() if rid >= 0]
    assert ids and min(ids) > first_id  # the second session's range got a new id, not the first one's again
    assert _ranges(m).loc["new", "kernels"] == 1


def test_a_name_with_the_separator_is_its_own_range(fake, cupti) -> None:
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        t0 = time.monotonic_ns()
        with ranges.entered("enc / dec"):
            _inject(cupti, b"k", t0, t0 + 10 * MS)
        with ranges.entered(7):  # a phase named by a number: names are strings
            _inject(cupti, b"k", t0 + 10 * MS, t0 + 20 * MS)
        time.sleep(0.05)
    table = _ranges(m)
    assert table.loc["enc / dec", "depth"] == 0 and table.loc["7", "kernels"] == 1


def test_the_nvtx_wrapper_returns_torchs_value_and_survives_our_failure(fake, cupti, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: 41)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: 42)
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True):
        assert torch.cuda.nvtx.range_push("a") == 41 and torch.cuda.nvtx.range_pop() == 42
        ranges = _session.current().kernel_tracing().ranges
        monkeypatch.setattr(ranges, "push", lambda name: 1 / 0)
        with pytest.warns(RuntimeWarning, match="could not record a range"):
            assert torch.cuda.nvtx.range_push("b") == 41
        torch.cuda.nvtx.range_pop()


def test_ranges_are_not_a_tracer_option(fake, cupti) -> None:
    with pytest.raises(ValueError, match="per meter"):
        _session.current().kernel_tracing().configure(ranges=True)


def test_the_trace_shows_each_kernels_range_and_each_range_as_a_gpu_span(fake, cupti, tmp_path) -> None:
    import json

    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        t0 = time.monotonic_ns()
        with ranges.entered("step"):
            _inject(cupti, b"a", t0, t0 + 10 * MS)
            with ranges.entered("inner"):
                _inject(cupti, b"b", t0 + 12 * MS, t0 + 20 * MS)
        _inject(cupti, b"c", t0 + 25 * MS, t0 + 30 * MS)
        time.sleep(0.05)
    events = json.loads(m.save_trace(tmp_path / "t.json").read_text())["traceEvents"]
    kernels = {e["name"]: e for e in events if e["ph"] == "X" and e.get("cat") == "kernel"}
    assert kernels["a"]["args"]["range"] == "step" and kernels["b"]["args"]["range"] == "step / inner"
    assert "range" not in kernels["c"]["args"]
    spans = {e["args"]["range"]: e for e in events if e.get("cat") == "range"}
    assert set(spans) == {"step", "step / inner"}
    assert spans["step"]["ts"] == pytest.approx(kernels["a"]["ts"]) and spans["step"]["dur"] == pytest.approx(20_000)
    assert spans["step / inner"]["dur"] == pytest.approx(8_000) and spans["step / inner"]["tid"] != spans["step"]["tid"]
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {"ranges, depth 0", "ranges, depth 1"} <= tracks


def test_overlapping_sibling_ranges_get_lanes_of_their_own_in_the_trace(fake, cupti, tmp_path) -> None:
    import json

    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        t0 = time.monotonic_ns()
        with ranges.entered("a"):  # launched first, on stream 7
            assert cupti.fake_cupti_inject(KIND_KERNEL, 0, 7, b"ka", t0, t0 + 30 * MS, next(_correlation)) == 1
        with ranges.entered("b"):  # runs alongside it, on stream 8
            corr = next(_correlation)
            assert cupti.fake_cupti_inject(KIND_KERNEL, 0, 8, b"kb", t0 + 10 * MS, t0 + 40 * MS, corr) == 1
        time.sleep(0.05)
    events = json.loads(m.save_trace(tmp_path / "t.json").read_text())["traceEvents"]
    spans = {e["name"]: e for e in events if e.get("cat") == "range"}
    assert spans["a"]["tid"] != spans["b"]["tid"]  # one track's slices must nest; these overlap
    ts = [e["ts"] for e in events if e["ph"] != "M"]
    assert ts == sorted(ts)


def test_a_failure_to_record_keeps_the_users_push_and_pop_paired(fake, cupti, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: 0)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: 0)
    fake.set_trace(0, [0.0], [100.0])
    with PowerMeter(0, kernels=True, ranges=True) as m:
        ranges = _session.current().kernel_tracing().ranges
        with torch.cuda.nvtx.range("outer"):
            original = ranges._push_entry
            monkeypatch.setattr(ranges, "_push_entry", lambda *a: 1 / 0)
            with pytest.warns(RuntimeWarning, match="could not record"), torch.cuda.nvtx.range("inner"):
                pass
            monkeypatch.setattr(ranges, "_push_entry", original)
            t0 = time.monotonic_ns()
            _inject(cupti, b"k", t0, t0 + 10 * MS)  # after inner's pop, still inside outer
        time.sleep(0.05)
    assert _ranges(m).loc["outer", "kernels"] == 1


def test_a_range_that_overflowed_in_one_run_is_recorded_in_the_next(fake, cupti, monkeypatch) -> None:
    fake.set_trace(0, [0.0], [100.0])
    monkeypatch.setattr(ranges_module, "MAX_RANGES", 1)
    ranges = _session.current().kernel_tracing().ranges
    with ranges.entered("outer"), ranges.entered("mid"):
        with PowerMeter(0, kernels=True, ranges=True) as m1:  # records outer; mid overflows
            t0 = time.monotonic_ns()
            _inject(cupti, b"k1", t0, t0 + 10 * MS)
            time.sleep(0.05)
        monkeypatch.setattr(ranges_module, "MAX_RANGES", 100)
        with PowerMeter(0, kernels=True, ranges=True) as m2, ranges.entered("inner"):
            t0 = time.monotonic_ns()
            _inject(cupti, b"k2", t0, t0 + 10 * MS)
        time.sleep(0.05)
    first = m1.range_attribution(method="overlap")
    assert first.set_index("range").loc["outer", "kernels"] == 1
    assert any("not recorded" in n for n in first.attrs["notes"])
    assert _ranges(m2).loc["outer / mid / inner", "kernels"] == 1
