"""Duty-cycled kernel tracing: where the untraced time lies on the GPU, and energy per kernel extrapolated from the
traced stretches to the whole window.

Why: CUPTI's kernel tracing costs ~1.5 us of host time per launch (H100, bench/RESULTS.md), which slows code whose
pace the host's launches set (eager PyTorch at small per-kernel work) by several percent, while disabled kinds cost
nothing. ``PowerMeter(kernels=True, kernel_duty=0.25)`` has the sampler thread trace one quantum (0.25 s) in four
and disable tracing for the others (KernelTracer::service). Measured on eager resnet50 (H100), the cost per launch
fell to 42-46 % of full tracing's, not 25 %: the first launches after each resume cost more (bench/RESULTS.md,
session 7). Experimental: see PowerMeter's ``kernel_duty``.

Where the untraced time lies. The tracer stamps each pause on the host: ``[p, r]``, from just before the kinds were
disabled to just after they were enabled again. The kernels launched in between have no record, and they run on the
GPU later than they were launched, by however far the host runs ahead of the GPU. On the GPU they leave a hole in
the recorded timeline: after the last recorded kernel launched before ``p``, before the first launched after ``r``
(which cannot start before ``r``). A steady workload fills the hole with about as much GPU time as the pause lasted,
so the hole of a pause is taken to be the first gap in the records (all streams merged) that ends after ``r`` and
leaves at least half the pause after the previous pause's hole; it starts no earlier than ``p`` (a kernel running
before ``p`` was launched before it, so it would have a record) and lasts no longer than the pause plus the longest
kernel recorded (an idle gap may be far longer; a hole that grew further, because the GPU fell behind, loses that
sliver to idle). Where no such gap exists (a kernel
spanning the pause, a workload that stopped launching), the host stretch itself is taken, and a note says so.

Extrapolation. The traced stretches are a sample of the window (one quantum in every few, evenly spread), so the
untraced time is taken to hold the same mix: each row's time and calls are scaled by window / traced time, and the
untraced energy (measured, the ``[untraced]`` row of the attribution) is shared over the rows in proportion to their
traced energy. The uncertainty adds the sampling error: how much a row's share of time varies from one traced
stretch to the next (the standard error of a ratio estimator over the stretches), times the untraced time, times the
row's mean power, and its share of the untraced energy's own uncertainty. A sampled window extrapolates over all its
untraced time, a torch.profiler session's included. This assumes the window's work is steady on the scale of the
duty period (inference or training loops); a window whose work changes in a way that lines up with the duty period
would be misread, so the sampled table says it is sampled (``notes``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .kernels import (
    IDLE,
    OTHER,
    UNATTRIBUTED,
    UNTRACED,
    Attribution,
    KernelEnergy,
    KernelTimeline,
    group_keys,
    union_by_group,
)

_NS_PER_S = 1e9
HOLDER = "duty cycle"  # the holder named in a sampled window's untraced stretches
# A hole must hold at least this share of its pause's length to be taken as the pause's (see the module docstring).
_MIN_HOLE_SHARE = 0.5


def busy_gaps(timeline: KernelTimeline) -> tuple[np.ndarray, np.ndarray]:
    """The gaps between the records' merged busy intervals (all streams), as (starts, ends) in ns."""
    if len(timeline) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(timeline.start_ns, kind="stable")
    start = timeline.start_ns[order]
    run_end = np.maximum.accumulate(timeline.end_ns[order])
    gap = start[1:] > run_end[:-1]
    return run_end[:-1][gap], start[1:][gap]


def merge_stretches(stretches: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or touching stretches merged (a fallback host stretch may overlap a hole, a duty hole
    a torch.profiler stretch)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(stretches):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def gpu_stretches(paused: list[tuple[int, int]], timeline: KernelTimeline) -> tuple[list[tuple[int, int]], int]:
    """The GPU time the pauses ``[(p, r), ...]`` (host stamps, in order) left untraced, and how many of them fell
    back to the host stretch (no hole found). ``timeline``: one GPU's records around the window.

    The time before the first record and after the last count as gaps too: the records kept reach only a second
    before the window, so an earlier pause's hole may begin before them, and a pause still running at the window's
    end (or on a GPU that ran nothing) has no record after it. A hole starts no earlier than its pause and the
    previous hole's end, and lasts no longer than its pause plus the longest record: a long idle gap (a GPU that
    stopped, or was idle for a while) then gives each pause in it a hole of its own, and its traced quanta stay
    traced."""
    g0, g1 = busy_gaps(timeline)
    if len(timeline):
        g0 = np.concatenate(([np.iinfo(np.int64).min], g0, [int(timeline.end_ns.max())]))
        g1 = np.concatenate(([int(timeline.start_ns.min())], g1, [0]))
    else:
        g0, g1 = np.array([np.iinfo(np.int64).min]), np.array([0])
    # A kernel launched just before the resume may run up to its length past it: the hole may be that much longer.
    slack_ns = int((timeline.end_ns - timeline.start_ns).max()) if len(timeline) else 0
    out: list[tuple[int, int]] = []
    fallbacks = 0
    after = np.iinfo(np.int64).min  # the previous hole's end
    for p, r in paused:
        g1[-1] = max(r + 1, int(g0[-1]) + 1)  # after the last record, nothing is known past this pause
        need = _MIN_HOLE_SHARE * (r - p)
        start = np.maximum(np.maximum(g0, p), after)
        ok = np.flatnonzero((g1 > r) & (g1 - start >= need))
        if ok.size:
            i = int(ok[0])
            lo = int(start[i])
            # As long as its pause (plus a kernel) at most: the GPU's lag behind the host is about the same at both
            # ends of a steady workload's hole, while an idle gap may be far longer, and its traced quanta must stay
            # traced.
            hi = min(int(g1[i]), lo + (r - p) + slack_ns)
        else:
            lo, hi = p, r
            fallbacks += 1
        out.append((lo, hi))
        after = max(after, hi)
    return out, fallbacks


def _row_of_record(att: Attribution, group_by: str) -> np.ndarray:
    """The row name of every record of ``att.timeline`` (its class, or [other] when merged)."""
    names = {r.name for r in att.rows}
    return np.array([k if k in names else OTHER for k in group_keys(att.timeline, group_by).astype(str).tolist()],
                    dtype=object)


def _overlap_ns(start: np.ndarray, end: np.ndarray, lo: int, hi: int) -> float:
    return float(np.clip(np.minimum(end, hi) - np.maximum(start, lo), 0, None).sum())


def _union_ns(start: np.ndarray, end: np.ndarray, lo: int, hi: int) -> float:
    return float(union_by_group(np.zeros(start.size, np.int64), np.clip(start, lo, hi), np.clip(end, lo, hi), 1)[0])


def _ratio_se(tau: np.ndarray, length: np.ndarray) -> float:
    """Standard error of sum(tau) / sum(length) over the stretches (ratio estimator); inf with fewer than 2."""
    n = tau.size
    if n < 2:
        return math.inf
    f = tau.sum() / length.sum()
    mean_len = length.mean()
    resid = (tau - f * length) / mean_len
    return float(math.sqrt((resid**2).sum() / (n * (n - 1))))


def extrapolate(att: Attribution, untraced: list[tuple[int, int]], group_by: str = "name") -> Attribution:
    """``att`` (whose timeline holds the window's ``[untraced]`` stretches) with the untraced time and energy
    shared over its rows, as the module docstring says. Returns ``att`` itself when nothing was untraced."""
    a, b = att.start_ns, att.stop_ns
    stretches = merge_stretches([(max(lo, a), min(hi, b)) for lo, hi in untraced if min(hi, b) > max(lo, a)])
    untraced_ns = float(sum(hi - lo for lo, hi in stretches))
    window_ns = float(b - a)
    traced_ns = window_ns - untraced_ns
    by_name = {r.name: r for r in att.rows}

    def as_is(why: str) -> Attribution:
        return replace(att, notes=att.notes + (
            f"not extrapolated ({why}): kernels were not traced for {untraced_ns / _NS_PER_S:.3f} s of the window "
            f"(duty-cycled), whose energy is the {UNTRACED} row",))

    if untraced_ns <= 0:
        return att
    if UNTRACED not in by_name:
        return as_is(f"the estimator merged {UNTRACED} into another row: too little untraced time to fit")
    if traced_ns <= 0:
        return as_is("no part of the window was traced")
    # The traced spans: the window minus the untraced stretches.
    edges = [a] + [x for s in stretches for x in s] + [b]
    spans = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]]
    span_len = np.array([hi - lo for lo, hi in spans], dtype=np.float64)

    tl = att.timeline
    row_of = _row_of_record(att, group_by)
    real = row_of != UNTRACED
    e_untraced = by_name[UNTRACED].energy_j
    u_untraced = by_name[UNTRACED].uncertainty_j
    sharing = [r for r in att.rows if r.name not in (UNTRACED, UNATTRIBUTED)]
    traced_j = sum(r.energy_j for r in sharing)
    if traced_j <= 0 or e_untraced < 0:
        return as_is(f"the traced stretches hold {traced_j:.1f} J and the untraced ones {e_untraced:.1f} J, which "
                     "cannot be shared out")
    gain = 1.0 + e_untraced / traced_j
    scale_t = window_ns / traced_ns

    rows: list[KernelEnergy] = []
    for r in sharing:
        if r.name == IDLE:
            sel = real
            tau = np.array([(hi - lo) - _union_ns(tl.start_ns[sel], tl.end_ns[sel], lo, hi) for lo, hi in spans])
        else:
            sel = row_of == r.name
            tau = np.array([_overlap_ns(tl.start_ns[sel], tl.end_ns[sel], lo, hi) for lo, hi in spans])
        power_w = r.mean_power_w if math.isfinite(r.mean_power_w) else 0.0
        se = _ratio_se(tau, span_len)
        sampling_j = (power_w * untraced_ns / _NS_PER_S * se if math.isfinite(se)
                      else r.energy_j * (gain - 1.0))  # one stretch: the extrapolated part is all uncertain
        energy_j = r.energy_j * gain
        time_s = r.time_s * scale_t
        rows.append(KernelEnergy(
            name=r.name, calls=round(r.calls * scale_t), time_s=time_s, energy_j=energy_j,
            mean_power_w=energy_j / time_s if time_s > 0 else math.nan,
            share=energy_j / att.energy_j if att.energy_j else math.nan,
            # The untraced energy's own uncertainty (the window's, left with [untraced] by the model), shared too.
            uncertainty_j=math.sqrt((r.uncertainty_j * gain) ** 2 + sampling_j**2
                                    + (u_untraced * r.energy_j / traced_j) ** 2),
        ))
    kernels = sorted((r for r in rows if r.name != IDLE), key=lambda r: r.energy_j, reverse=True)
    rows = kernels + [r for r in rows if r.name == IDLE] + [by_name[UNATTRIBUTED]]
    kernel_j = np.where(real, att.kernel_energy_j * gain, 0.0)
    note = (f"kernels were traced for {traced_ns / window_ns:.0%} of the window ({len(spans)} stretches, "
            f"duty-cycled): times, calls and energies include the untraced {untraced_ns / _NS_PER_S:.3f} s "
            f"({e_untraced:.1f} J), extrapolated from the traced stretches; uncertainties include the sampling "
            "error. Assumes the work is steady on the scale of the duty period.")
    return replace(att, rows=tuple(rows), kernel_energy_j=kernel_j, notes=att.notes + (note,))
