"""Duty-cycled tracing (kernel_sampling.py): finding the GPU time each pause left untraced, and extrapolating the
per-kernel table from the traced stretches, checked against the truth of synthetic workloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_kernels import H100, MS, POWER_W, T0, sense, timeline_of, true_energy_j, workload

from wattscope.kernel_sampling import busy_gaps, extrapolate, gpu_stretches
from wattscope.kernels import IDLE, UNATTRIBUTED, UNTRACED, KernelTimeline, attribute

QUANTUM_NS = 250 * MS


def duty_pauses(a: int, b: int, off_quanta: int) -> list[tuple[int, int]]:
    """The host stretches of a duty cycle tracing one quantum in off_quanta + 1, from a to b."""
    out, t = [], a + QUANTUM_NS
    while t < b:
        out.append((t, min(t + off_quanta * QUANTUM_NS, b)))
        t += (off_quanta + 1) * QUANTUM_NS
    return out


def launched_outside(tl: KernelTimeline, launch_ns: np.ndarray, pauses: list[tuple[int, int]]) -> KernelTimeline:
    """The records a paused tracer keeps: kernels launched outside every pause."""
    inside = np.zeros(len(tl), bool)
    for p, r in pauses:
        inside |= (launch_ns >= p) & (launch_ns < r)
    return tl.take(np.flatnonzero(~inside))


def with_untraced(tl: KernelTimeline, stretches: list[tuple[int, int]]) -> KernelTimeline:
    return KernelTimeline.concat([tl, KernelTimeline.untraced(stretches, 0)])


def test_busy_gaps_merge_every_stream():
    tl = timeline_of([0, 5, 30, 31], [10, 20, 40, 35], ["a", "b", "a", "b"], stream=[1, 2, 1, 2])
    g0, g1 = busy_gaps(tl)
    assert g0.tolist() == [20] and g1.tolist() == [30]  # [0, 20] and [30, 40] are busy on one stream or the other
    e0, e1 = busy_gaps(KernelTimeline.empty())
    assert e0.size == 0 and e1.size == 0


def test_the_hole_of_a_pause_where_the_host_sets_the_pace():
    # A kernel of 0.8 ms launched every ms, each starting 20 us after its launch.
    launch = T0 + np.arange(2000) * MS
    tl = timeline_of(launch + 20_000, launch + 820_000, ["k"] * launch.size)
    p, r = T0 + 500 * MS + 900_000, T0 + 1250 * MS + 300_000
    kept = launched_outside(tl, launch, [(p, r)])
    (lo, hi), = gpu_stretches([(p, r)], kept)[0]
    assert lo == p  # the gap began 80 us before the pause (the last kernel ended): clipped to the pause
    assert hi == T0 + 1251 * MS + 20_000  # the first kernel launched after the resume
    assert gpu_stretches([(p, r)], kept)[1] == 0
    # A pause that begins while a kernel runs: its hole begins when that kernel ends.
    p2 = T0 + 500 * MS + 300_000
    (lo2, _), = gpu_stretches([(p2, r)], launched_outside(tl, launch, [(p2, r)]))[0]
    assert lo2 == T0 + 500 * MS + 820_000


def test_the_holes_behind_a_deep_queue_lie_after_their_pauses():
    # The GPU is always busy and runs 0.6 s behind the host: longer than a traced quantum.
    lag_ns = 600 * MS
    launch = T0 + np.arange(4000) * MS
    tl = timeline_of(launch + lag_ns, launch + lag_ns + MS, ["k"] * launch.size)
    pauses = duty_pauses(T0, T0 + 3000 * MS, 3)
    kept = launched_outside(tl, launch, pauses)
    holes, fallbacks = gpu_stretches(pauses, kept)
    assert fallbacks == 0
    for (p, r), (lo, hi) in zip(pauses, holes, strict=True):
        # The kernels launched in [p, r) ran in [p + lag, r + lag), to the ms grid of the launches.
        assert lo == pytest.approx(p + lag_ns, abs=MS) and hi == pytest.approx(r + lag_ns, abs=MS)


def test_a_pause_with_no_gap_falls_back_to_its_host_stretch():
    tl = timeline_of([T0], [T0 + 2000 * MS], ["long"])  # one kernel running across the whole pause
    p, r = T0 + 500 * MS, T0 + 1000 * MS
    assert gpu_stretches([(p, r)], tl) == ([(p, r)], 1)


def steady_batches(a: int, n: int, seed: int, scale: float = 1.0) -> tuple[KernelTimeline, np.ndarray]:
    """n "batches" of one fixed sequence of kernels (as inference runs), each kernel starting 20 us after its
    launch and the next launched as it ends (the host sets the pace), with 2 % jitter; ``scale`` multiplies the
    durations (a 6.8 ms batch at 1). Returns records and launches."""
    rng = np.random.default_rng(seed)
    seq = [("gemm", 3.0 * scale), ("attn", 1.5 * scale), ("copy", 0.7 * scale), ("gemm", 1.2 * scale),
           ("attn", 0.4 * scale)]
    start, end, name, launch = [], [], [], []
    t = a + 100 * MS
    for _ in range(n):
        for cls, ms in seq:
            d = int(ms * MS * rng.uniform(0.98, 1.02))
            launch.append(t)
            start.append(t + 20_000)
            end.append(t + 20_000 + d)
            name.append(cls)
            t += d + 60_000
    return timeline_of(start, end, name), np.array(launch, np.int64)


def sampled_attribution(tl_full: KernelTimeline, launch: np.ndarray, a: int, b: int, off_quanta: int, seed: int):
    t, p = sense(tl_full, a, b, seed=seed)
    pauses = duty_pauses(a, b, off_quanta)
    kept = launched_outside(tl_full, launch, pauses)
    holes, _ = gpu_stretches(pauses, kept)
    att = attribute(with_untraced(kept, holes), t, p, a, b, response=H100, method="model")
    return att, extrapolate(att, holes), attribute(tl_full, t, p, a, b, response=H100, method="model")


def test_a_steady_workload_traced_a_quarter_of_the_time_matches_full_tracing():
    # Kernels of 4-30 ms, which the readings resolve: the fit in the traced stretches is then as good as the fit
    # over everything, and what is left to test is the extrapolation. (Kernels far shorter than the sensor's
    # response, always in one mix, cannot be told apart by any fit; the uncertainty says so, as the next test shows.)
    a = T0
    tl, launch = steady_batches(a, 200, seed=3, scale=10.0)  # 200 batches of ~68 ms: ~14 s
    b = int(tl.end_ns.max()) + 100 * MS
    raw, sampled, full = sampled_attribution(tl, launch, a, b, off_quanta=3, seed=3)
    assert UNTRACED in {r.name for r in raw.rows}
    rows = {r.name: r for r in sampled.rows}
    assert UNTRACED not in rows
    assert sum(r.energy_j for r in sampled.rows) == pytest.approx(sampled.energy_j, rel=1e-9)
    truth = true_energy_j(tl)
    full_rows = {r.name: r for r in full.rows}
    for cls in POWER_W:
        # Within 3 % of the truth and of tracing everything, and the stated uncertainty covers the difference.
        assert rows[cls].energy_j == pytest.approx(truth[cls], rel=0.03), cls
        assert rows[cls].energy_j == pytest.approx(full_rows[cls].energy_j, rel=0.03), cls
        assert abs(rows[cls].energy_j - truth[cls]) <= 3 * rows[cls].uncertainty_j + 0.01 * truth[cls], cls
        assert rows[cls].calls == pytest.approx(full_rows[cls].calls, rel=0.02), cls
        assert rows[cls].time_s == pytest.approx(full_rows[cls].time_s, rel=0.02), cls
    # Idle is over-represented in the traced stretches (the window's idle edges are traced), so its extrapolation
    # is biased up; it is a small share either way.
    assert abs(rows[IDLE].energy_j - full_rows[IDLE].energy_j) < 0.005 * sampled.energy_j
    assert any("traced for 25% of the window" in n for n in sampled.notes)
    assert not any("were not traced for" in n for n in sampled.notes)
    untraced_j = {r.name: r for r in raw.rows}[UNTRACED].energy_j
    kernel_j = sampled.kernel_energy_j[sampled.timeline.kind != "untraced"].sum()
    assert kernel_j + rows[IDLE].energy_j + rows[UNATTRIBUTED].energy_j == pytest.approx(sampled.energy_j, rel=1e-6)
    assert untraced_j > 0.5 * sampled.energy_j  # three quarters of the window were extrapolated


def test_a_mix_faster_than_the_sensor_is_uncertain_and_says_so():
    # Batches of 6.8 ms, the classes always in the same mix: the traced stretches cannot separate them.
    tl, launch = steady_batches(T0, 2000, seed=3)
    b = int(tl.end_ns.max()) + 100 * MS
    _, sampled, _ = sampled_attribution(tl, launch, T0, b, off_quanta=3, seed=3)
    rows = {r.name: r for r in sampled.rows}
    truth = true_energy_j(tl)
    for cls in POWER_W:
        assert abs(rows[cls].energy_j - truth[cls]) <= 3 * rows[cls].uncertainty_j, cls
    total = sum(rows[c].energy_j for c in POWER_W)
    assert total == pytest.approx(sum(truth.values()), rel=0.03)  # the kernels' sum is still right


def test_a_random_mix_gets_an_honest_sampling_error():
    # Classes in random order with durations up to 50 ms: a quarter-second stretch holds a few calls, so the mix
    # varies from stretch to stretch and the extrapolation is uncertain; the stated uncertainty must say so.
    tl, a, b = workload(seed=5, busy_s=30.0, lo_ms=1.0, hi_ms=50.0, gap_ms=0.1)
    launch = tl.start_ns - 20_000
    raw, sampled, _ = sampled_attribution(tl, launch, a, b, off_quanta=3, seed=5)
    rows = {r.name: r for r in sampled.rows}
    truth = true_energy_j(tl)
    z = [(rows[c].energy_j - truth[c]) / rows[c].uncertainty_j for c in POWER_W]
    assert all(abs(v) < 3.5 for v in z), z
    # The sampling error dominates: larger than the fit's own uncertainty in the traced stretches, scaled.
    raw_rows = {r.name: r for r in raw.rows}
    assert all(rows[c].uncertainty_j > 2 * raw_rows[c].uncertainty_j for c in POWER_W)


def test_nothing_untraced_leaves_the_attribution_alone():
    tl, launch = steady_batches(T0, 200, seed=1)
    b = int(tl.end_ns.max()) + 100 * MS
    t, p = sense(tl, T0, b, seed=1)
    att = attribute(tl, t, p, T0, b, response=H100, method="model")
    assert extrapolate(att, []) is att


def test_one_traced_stretch_states_the_extrapolated_part_as_all_uncertain():
    tl, launch = steady_batches(T0, 200, seed=2)  # ~1.4 s: one quantum traced, then paused to the end
    b = int(tl.end_ns.max()) + 100 * MS
    t, p = sense(tl, T0, b, seed=2)
    pauses = [(T0 + QUANTUM_NS, b)]
    kept = launched_outside(tl, launch, pauses)
    holes, _ = gpu_stretches(pauses, kept)
    att = attribute(with_untraced(kept, holes), t, p, T0, b, response=H100, method="model")
    out = {r.name: r for r in extrapolate(att, holes).rows}
    before = {r.name: r for r in att.rows}
    extra = out["gemm"].energy_j - before["gemm"].energy_j
    assert extra > 0
    assert out["gemm"].uncertainty_j >= extra * (1 - 1e-9)
    assert math.isfinite(out["gemm"].uncertainty_j)


def test_a_pause_older_than_the_records_kept_does_not_take_the_next_pauses_hole():
    # The capture keeps records from a second before the window, but pauses whose resume falls in that second: the
    # first such pause began before the first record kept. Its hole must not be looked for in the next pause's.
    launch = T0 + np.arange(6000) * MS
    tl = timeline_of(launch + 20_000, launch + 820_000, ["k"] * launch.size)
    pauses = duty_pauses(T0, T0 + 6000 * MS, 3)
    kept = launched_outside(tl, launch, pauses)
    full, fallbacks_full = gpu_stretches(pauses, kept)
    assert fallbacks_full <= 1  # at most the last pause, which reaches the end of the work
    cut = pauses[1][0] + 300 * MS  # inside the second pause
    trimmed = kept.take(np.flatnonzero(kept.end_ns >= cut))
    holes, _ = gpu_stretches(pauses[1:], trimmed)
    assert holes[0][0] == pauses[1][0]  # from the pause, as nothing before the records is known
    assert holes[0][1] == full[1][1]  # ending where the full timeline's hole ends
    assert holes[1:] == full[2:]  # every later pause keeps its own hole


def test_a_pause_still_running_at_the_end_and_a_gpu_that_ran_nothing_need_no_fallback():
    launch = T0 + np.arange(1000) * MS
    tl = timeline_of(launch + 20_000, launch + 820_000, ["k"] * launch.size)
    p, r = T0 + 900 * MS + 900_000, T0 + 1500 * MS  # the work ends at 1 s, the pause at 1.5 s
    (lo, hi), = gpu_stretches([(p, r)], launched_outside(tl, launch, [(p, r)]))[0]
    assert lo == p and hi == r + 1  # to the end of what is known: the pause
    assert gpu_stretches([(p, r)], KernelTimeline.empty()) == ([(p, r)], 0)


def test_overlapping_untraced_stretches_count_once():
    tl, launch = steady_batches(T0, 1000, seed=4, scale=2.0)
    b = int(tl.end_ns.max()) + 100 * MS
    t, p = sense(tl, T0, b, seed=4)
    pauses = duty_pauses(T0, b, 3)
    kept = launched_outside(tl, launch, pauses)
    holes, _ = gpu_stretches(pauses, kept)
    doubled = holes + [(lo + 10 * MS, hi - 10 * MS) for lo, hi in holes]  # each hole once more, inside itself
    att = attribute(with_untraced(kept, holes), t, p, T0, b, response=H100, method="model")
    once = {r.name: r for r in extrapolate(att, holes).rows}
    twice = {r.name: r for r in extrapolate(att, doubled).rows}
    for name, row in once.items():
        assert twice[name].calls == row.calls and twice[name].time_s == pytest.approx(row.time_s), name


@pytest.mark.parametrize("idle_at", ["head", "middle", "tail"])
def test_a_long_idle_stretch_gives_each_of_its_pauses_its_own_hole(idle_at):
    # The GPU idles for 5 s (before, amid or after steady work) while the duty cycle goes on: each pause in the idle
    # stretch gets a hole of about its own length, and the rest of the stretch stays idle.
    work, launch = steady_batches(T0, 700, seed=6, scale=1.5)  # ~7 s of batches
    shift = {"head": 5000 * MS, "middle": 0, "tail": 0}[idle_at]
    tl = KernelTimeline(work.start_ns + shift, work.end_ns + shift, work.name, work.stream, work.device, work.kind)
    launch = launch + shift
    if idle_at == "middle":
        late = tl.start_ns > T0 + 3500 * MS
        tl = KernelTimeline(tl.start_ns + np.where(late, 5000 * MS, 0), tl.end_ns + np.where(late, 5000 * MS, 0),
                            tl.name, tl.stream, tl.device, tl.kind)
        launch = launch + np.where(late, 5000 * MS, 0)
    b = int(tl.end_ns.max()) + (5000 * MS if idle_at == "tail" else 100 * MS)
    raw, sampled, full = sampled_attribution(tl, launch, T0, b, off_quanta=3, seed=6)
    rows, full_rows = {r.name: r for r in sampled.rows}, {r.name: r for r in full.rows}
    for cls in POWER_W:
        assert rows[cls].calls == pytest.approx(full_rows[cls].calls, rel=0.06), (idle_at, cls)
    assert rows[IDLE].energy_j == pytest.approx(full_rows[IDLE].energy_j, rel=0.25), idle_at


def test_every_pause_on_a_gpu_that_ran_nothing_is_its_host_stretch():
    pauses = duty_pauses(T0, T0 + 5000 * MS, 3)
    holes, fallbacks = gpu_stretches(pauses, KernelTimeline.empty())
    assert fallbacks == 0 and holes == pauses
