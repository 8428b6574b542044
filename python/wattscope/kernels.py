"""Per-kernel energy: a CUPTI kernel timeline plus the power samples of the same GPU, turned into a table of energy
per kernel name.

Units: times are int64 nanoseconds on CLOCK_MONOTONIC (``*_ns``), the same clock as the power stamps; power in W,
energy in J, durations in results in s.

What a kernel's energy means here
---------------------------------
A kernel's energy is the GPU's energy while it runs, static (idle) power included, so that ``mean_power_w`` of a
row reads as "the board draws this much while that kernel runs". Kernels running at the same time (several streams)
share the time equally: at an instant with ``n`` kernels running each is credited ``1/n`` of the power. Time with
no kernel running is the ``[idle]`` row. Energy an estimator cannot place is ``[unattributed]``. The rows add up to
the window's energy as :func:`wattscope.energy.integrate_window` estimates it over the same (aligned) readings.

Under concurrency the two estimators split differently: ``"overlap"`` divides the measured power equally between
the kernels running at an instant (it cannot tell who draws what), ``"model"`` credits each class its own fitted
increment over idle and divides only the idle power equally.

Two estimators
--------------
``"overlap"`` spreads each reading over the interval it accounts for (the energy.py reconstruction, after shifting
the stamps by the response's group delay minus half a sample period, as :class:`wattscope.sensor.SensorModel` does)
and splits that energy over what ran in the interval by the shared busy time above. It needs no model beyond the
alignment but it cannot resolve anything shorter than a sample period (~20 ms on H100): a 1 ms kernel is credited
the mean power of the 20 ms around it, so short kernels of different classes smear into each other. Energy in
stretches no reading covers (gaps, before the first and after the last reading) is ``[unattributed]``.

Its uncertainty counts the sample resolution only. Inside a reading's interval of length ``L`` a row that occupies
a fraction ``f`` of the time is credited ``f`` of the energy; the true share can differ by at most
``min(f, 1 - f) * L * range(p)`` (the same argument as energy.py's window-edge term: the row is a "window" inside
the interval), with the range of the true power estimated from the reading's largest difference to its neighbours,
halved for a one-sigma-like size. Terms of different intervals are added in quadrature. The sensor's smoothing
(tau) is *not* in it: it is a bias that the model estimator removes, not noise, and it dominates for short kernels.

``"model"`` fits the sensor's response to the busy schedule of every kernel class: reading ``k`` is modelled as
``idle_w + sum_c P_c * y_c(t_k)``, where ``y_c`` is the response (:class:`wattscope.response.Schedule`) to the class's
busy indicator, the *union* of its kernels' intervals (two kernels of one class running at once draw the class's
power once: a class's power is "while at least one of them runs", which keeps ``y_c`` in [0, 1]). The powers are
the non-negative least-squares solution (Lawson-Hanson active set) over the readings whose response lies mostly
inside the window: stamps in ``[start + delay + shape, stop + delay]`` (shape = low-pass tau or boxcar width).
Records of the timeline outside the window still enter their class's indicator (they explain readings near the
edges); those of classes that never run inside the window are left out, and whatever they drew is residual.
Class ``c`` is then credited ``P_c * busy_c`` (busy_c its union busy time inside the window) plus its share of the
idle power over the time it runs; ``[idle]`` is ``idle_w`` over the time nothing runs; ``[unattributed]`` is the
window's energy minus the model's, which may be negative (it is how far the fitted model and the integral disagree).

Untraced stretches (``[untraced]``: torch.profiler held CUPTI) hold kernels that ran unseen, whose mix and power
change from reading to reading: a single fitted power for them biases the traced classes' powers. So the fit leaves
out every reading the untraced time reaches (its response to it above 1 %), and ``[untraced]`` is credited what the
rest of the window's energy leaves over (idle power over its time plus the remainder), with the remainder's
uncertainty; ``[unattributed]`` is then 0. Around a simulated 2 s stretch this holds the traced classes within 3 %
of the truth, which fitting those readings too does not (tests/test_kernels.py). If too few readings are left, the
stretches are fitted as a class.

The increments carry a weak prior: each is drawn towards the increment of "the GPU is busy with anything" (fitted
first), with a width of 200 W. Its weight (noise variance over prior variance) is negligible for any class the
readings resolve; it matters for classes that always run in the same mix faster than the sensor follows (a model's
forward pass repeated every few ms), where the plain fit is free to trade one class's power for another's and
produced 4266 W on a 700 W board. There the powers stay near the common busy power, the uncertainties (which include
the prior) are of the prior's size, and the notes say so.

A class busy for less than two sample periods in the window has too little support to be fitted on its own: such
classes are merged into ``[other]``, and if the fit would still have fewer than ``columns + 2`` readings the least
busy classes are merged too; the notes say so. Uncertainties come from the residuals: the covariance of the
least-squares solution on the free (non-zero) variables, ``sigma^2 (X_F^T X_F)^-1`` with ``sigma^2 = RSS / (m - |F|)``
(a variable held at 0 takes its variance from the unconstrained fit), propagated to each row's energy. This assumes
independent residuals. A wrong response model raises the residuals and with them the uncertainties, but not enough
to cover its bias: in bench/attribution_sim.py (a simulation) fitting with delay 0 where the sensor had 3.8 ms took
the residual rms from 2 W (the noise) to ~45 W and left errors 2-4 times the stated uncertainty. Compare
``residual_rms_w`` with the sensor's noise, and calibrate the response (``wattscope calibrate``) before trusting
short kernels.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from . import energy
from .response import Response, Schedule, stamp_shift_ns

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Attribution", "KernelEnergy", "KernelTimeline", "attribute", "nnls"]

# "untraced" marks a stretch in which another CUPTI client (torch.profiler) held the activity API: kernels ran
# there unseen, so it is a row of its own rather than idle time.
KINDS = ("kernel", "memcpy", "memset", "untraced")
METHODS = ("overlap", "model")
GROUPINGS = ("name", "name+grid")
IDLE = "[idle]"
UNATTRIBUTED = "[unattributed]"
UNTRACED = "[untraced]"
OTHER = "[other]"
COLUMNS = ("name", "calls", "time_s", "energy_j", "mean_power_w", "share", "uncertainty_j")

_NS_PER_S = 1e9
# Two sample periods of busy time: below it a class's column has too few readings to be fitted on its own.
_MIN_SUPPORT_PERIODS = 2.0
# How far a kernel class's power may be from the GPU's common busy power before the readings must say so (the
# model's prior): H100 classes measured alone span ~130-700 W.
_PRIOR_SCALE_W = 200.0
# A reading whose response to the untraced time exceeds this is left out of the fit (module docstring): at most
# ~2 W of an unseen mix 200 W off the fitted power.
_UNTRACED_REACH = 0.01


def _int_array(values: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"KernelTimeline.{name} must be 1-D, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"KernelTimeline.{name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _object_array(values: ArrayLike, name: str) -> np.ndarray:
    a = np.array(values, dtype=object)  # a copy: the read-only flag set later must not reach the caller's array
    if a.ndim != 1:
        raise ValueError(f"KernelTimeline.{name} must be a 1-D array of strings, got shape {a.shape}")
    if not all(isinstance(v, str) for v in a.tolist()):
        raise ValueError(f"KernelTimeline.{name} must hold strings")
    return a


class WindowTooShortError(ValueError):
    """method='model' has too few readings inside the window to fit anything; method='overlap' still works."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; use method='overlap'")
        self.reason = reason


@dataclass(frozen=True, eq=False)
class KernelTimeline:
    """The GPU activity records of one measured GPU, one entry per kernel, memcpy or memset.

    Attributes:
        start_ns, end_ns: int64 CLOCK_MONOTONIC ns, ``end_ns >= start_ns``.
        name: object array of str (kernel names, demangled or not; the tracer's label for copies and sets).
        stream: int64 CUDA stream id.
        device: int64 CUDA device ordinal.
        kind: object array of ``"kernel"``, ``"memcpy"``, ``"memset"`` or ``"untraced"`` (a stretch in which
            kernels ran unseen, named ``[untraced]``).
        grid: optional object array of ``"gx,gy,gz"`` strings, for ``group_by="name+grid"``.
        dropped: records the tracer lost (CUPTI buffer full); their time counts as idle.
        range_id: optional int64 array, the innermost user range each record was launched in (-1: none); see
            ranges.py.

    ``eq=False`` because the fields are arrays. Inputs are converted and validated on construction.
    """

    start_ns: np.ndarray
    end_ns: np.ndarray
    name: np.ndarray
    stream: np.ndarray
    device: np.ndarray
    kind: np.ndarray
    grid: np.ndarray | None = None
    dropped: int = 0
    range_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        fields = {
            "start_ns": _int_array(self.start_ns, "start_ns"),
            "end_ns": _int_array(self.end_ns, "end_ns"),
            "name": _object_array(self.name, "name"),
            "stream": _int_array(self.stream, "stream"),
            "device": _int_array(self.device, "device"),
            "kind": _object_array(self.kind, "kind"),
        }
        if self.grid is not None:
            fields["grid"] = _object_array(self.grid, "grid")
        if self.range_id is not None:
            fields["range_id"] = _int_array(self.range_id, "range_id")
        n = fields["start_ns"].size
        lengths = {k: v.size for k, v in fields.items()}
        if any(size != n for size in lengths.values()):
            raise ValueError(f"KernelTimeline arrays differ in length: {lengths}")
        bad = np.flatnonzero(fields["end_ns"] < fields["start_ns"])
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"KernelTimeline record {i} ({fields['name'][i]!r}) ends before it starts: "
                f"[{int(fields['start_ns'][i])}, {int(fields['end_ns'][i])}]"
            )
        unknown = sorted(set(fields["kind"].tolist()) - set(KINDS))
        if unknown:
            raise ValueError(f"KernelTimeline.kind holds {unknown}: expected one of {KINDS}")
        try:
            dropped = operator.index(self.dropped)
        except TypeError:
            raise ValueError(f"KernelTimeline.dropped must be an integer count, got {self.dropped!r}") from None
        if dropped < 0:
            raise ValueError(f"KernelTimeline.dropped must be >= 0, got {dropped}")
        for key, value in fields.items():
            value.setflags(write=False)
            object.__setattr__(self, key, value)
        object.__setattr__(self, "dropped", dropped)

    def __len__(self) -> int:
        return int(self.start_ns.size)

    @classmethod
    def empty(cls, *, dropped: int = 0) -> KernelTimeline:
        """A timeline with no records (a window in which nothing ran, or the tracer lost everything)."""
        i = np.empty(0, dtype=np.int64)
        o = np.empty(0, dtype=object)
        return cls(i, i, o, i, i, o, None, dropped)

    @classmethod
    def untraced(cls, stretches: list[tuple[int, int]], device: int) -> KernelTimeline:
        """One ``[untraced]`` record per ``(start_ns, stop_ns)`` stretch of one device: time in which kernels ran
        unseen (torch.profiler held CUPTI)."""
        n = len(stretches)
        return cls(np.array([a for a, _ in stretches], dtype=np.int64),
                   np.array([b for _, b in stretches], dtype=np.int64), np.array([UNTRACED] * n, dtype=object),
                   np.full(n, -1, dtype=np.int64), np.full(n, device, dtype=np.int64),
                   np.array(["untraced"] * n, dtype=object))

    @classmethod
    def concat(cls, parts: list[KernelTimeline]) -> KernelTimeline:
        """One timeline of several (records in order of ``parts``; ``dropped`` summed; grid kept only when every
        part has one; range ids kept when any part has them, -1 for the records of parts without)."""
        if not parts:
            return cls.empty()
        grids = [p.grid for p in parts]
        ranges = None
        if any(p.range_id is not None for p in parts):
            ranges = np.concatenate([np.full(len(p), -1, dtype=np.int64) if p.range_id is None else p.range_id
                                     for p in parts])
        return cls(
            np.concatenate([p.start_ns for p in parts]), np.concatenate([p.end_ns for p in parts]),
            np.concatenate([p.name for p in parts]), np.concatenate([p.stream for p in parts]),
            np.concatenate([p.device for p in parts]), np.concatenate([p.kind for p in parts]),
            None if any(g is None for g in grids) else np.concatenate(grids), sum(p.dropped for p in parts), ranges,
        )

    def take(self, index: ArrayLike) -> KernelTimeline:
        """The records selected by an integer or boolean index, ``dropped`` kept."""
        idx = np.asarray(index)
        return KernelTimeline(
            self.start_ns[idx], self.end_ns[idx], self.name[idx], self.stream[idx], self.device[idx],
            self.kind[idx], None if self.grid is None else self.grid[idx], self.dropped,
            None if self.range_id is None else self.range_id[idx],
        )

    def for_device(self, device: int) -> KernelTimeline:
        """The records of one CUDA device."""
        return self.take(self.device == int(device))

    def clip(self, start_ns: int, stop_ns: int) -> KernelTimeline:
        """The records that overlap ``[start_ns, stop_ns]``, cut to it: a kernel running across an edge keeps the
        part inside (it is not lost); a zero-length record on an edge is kept."""
        a, b = _window(start_ns, stop_ns)
        keep = (self.end_ns >= a) & (self.start_ns <= b) & ((self.end_ns > a) | (self.start_ns == self.end_ns))
        keep &= (self.start_ns < b) | (self.start_ns == self.end_ns)
        out = self.take(keep)
        object.__setattr__(out, "start_ns", _readonly(np.clip(out.start_ns, a, b)))
        object.__setattr__(out, "end_ns", _readonly(np.clip(out.end_ns, a, b)))
        return out


@dataclass(frozen=True)
class KernelEnergy:
    """One row of an attribution: a kernel class (or ``[idle]``, ``[unattributed]``, ``[other]``, ``[untraced]``)."""

    name: str
    calls: int
    time_s: float  # summed duration of its calls inside the window (idle: time with nothing running)
    energy_j: float
    mean_power_w: float  # energy_j / time_s; nan when time_s is 0
    share: float  # energy_j / the window's energy
    uncertainty_j: float  # one-sigma-like, see the module docstring for each method


@dataclass(frozen=True, eq=False)
class Attribution:
    """Energy of every kernel class of one GPU over ``[start_ns, stop_ns]``.

    Attributes:
        method: ``"overlap"`` or ``"model"``.
        rows: kernel classes by decreasing energy, then ``[idle]`` and ``[unattributed]``; their energies add up to
            ``energy_j``.
        energy_j, uncertainty_j: the window's energy and its uncertainty (energy.py over the aligned readings), J.
        shift_ns: how far the stamps were moved back before integrating (the response's group delay minus half a
            sample period; 0 without a response).
        idle_power_w: the fitted idle power (model) or the mean power over idle time (overlap; nan when the GPU was
            never idle), W.
        class_power_w: per class, the power while it runs (model: ``idle_w + P_c``; overlap: energy / shared time).
        residual_rms_w: rms of the fit's residuals (model), nan for overlap.
        n_samples: readings used (model: in the fit; overlap: overlapping the window).
        dropped: activity records the tracer dropped; their kernels count as idle.
        notes: what the estimator did that the reader should know (merged classes, dropped records, ...).
        kernel_energy_j: per record of ``timeline`` (the clipped one, same order), the energy credited to it, J.
        timeline: the timeline clipped to the window.
    """

    method: str
    start_ns: int
    stop_ns: int
    rows: tuple[KernelEnergy, ...]
    energy_j: float
    uncertainty_j: float
    shift_ns: int
    idle_power_w: float
    class_power_w: dict[str, float]
    residual_rms_w: float
    n_samples: int
    dropped: int
    notes: tuple[str, ...]
    kernel_energy_j: np.ndarray
    timeline: KernelTimeline

    @property
    def table(self) -> pd.DataFrame:
        """The rows as a pandas DataFrame with columns name, calls, time_s, energy_j, mean_power_w, share,
        uncertainty_j; ``attrs`` carries method, dropped and notes."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Attribution.table needs pandas: pip install 'wattscope[pandas]'") from None
        df = pd.DataFrame([[getattr(r, c) for c in COLUMNS] for r in self.rows], columns=list(COLUMNS))
        df.attrs.update(method=self.method, dropped=self.dropped, notes=self.notes)
        return df


def attribute(
    timeline: KernelTimeline,
    t_ns: ArrayLike,
    power_w: ArrayLike,
    start_ns: int,
    stop_ns: int,
    *,
    response: Response | None = None,
    method: str = "overlap",
    group_by: str = "name",
    period_ns: int | None = None,
    shift_ns: int | None = None,
) -> Attribution:
    """Split the energy of ``[start_ns, stop_ns]`` over the kernels of ``timeline``.

    Args:
        timeline: one GPU's activity records (use :meth:`KernelTimeline.for_device` first if it holds several);
            it may reach beyond the window: records are clipped, and the model uses the outside ones to explain
            readings near the edges.
        t_ns: reading stamps of that GPU, strictly increasing int ns, CLOCK_MONOTONIC.
        power_w: readings, W.
        start_ns, stop_ns: the window, ns.
        response: the sensor response (required for ``"model"``; aligns the readings for ``"overlap"``).
        method: ``"overlap"`` or ``"model"`` (see the module docstring).
        group_by: ``"name"``, or ``"name+grid"`` (needs ``timeline.grid``) to tell launches of one kernel with
            different grids apart.
        period_ns, shift_ns: the sample period and the stamp shift the caller integrated the window with (a meter
            passes its Measurement's, so that the rows add up to its energy); by default the readings' median
            spacing and the response's shift for it.

    Raises:
        ValueError: bad arguments, several devices in the timeline, ``"model"`` without a response or with too
            few readings in the window.
    """
    if not isinstance(timeline, KernelTimeline):
        raise ValueError(f"timeline must be a KernelTimeline, got {type(timeline).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    if group_by not in GROUPINGS:
        raise ValueError(f"unknown group_by {group_by!r}: expected one of {GROUPINGS}")
    if group_by == "name+grid" and timeline.grid is None:
        raise ValueError("group_by='name+grid' needs timeline.grid (the tracer recorded no grid sizes)")
    if response is not None and not isinstance(response, Response):
        raise ValueError(f"response must be a wattscope.response.Response, got {type(response).__name__}")
    if method == "model" and response is None:
        raise ValueError("method='model' needs the sensor response (response=Response(...), from the sensor "
                         "profile or wattscope calibrate); use method='overlap' without one")
    devices = np.unique(timeline.device)
    if devices.size > 1:
        raise ValueError(f"the timeline holds records of CUDA devices {devices.tolist()}: attribute one GPU's "
                         "power at a time, with timeline.for_device(d)")
    t = energy._as_stamps(t_ns, "t_ns")
    p = np.asarray(power_w, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"t_ns and power_w differ in shape ({t.shape} != {p.shape})")
    if not np.isfinite(p).all():
        i = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"power_w must be finite: power_w[{i}]={p[i]}")
    a, b = _window(start_ns, stop_ns)
    if a == b:
        raise ValueError(f"the window [{a}, {b}] ns is empty")
    if t.size < 2:
        raise ValueError("need at least two power readings (their spacing is the sample period)")

    if period_ns is None:
        period_ns = max(1, round(float(np.median(np.diff(t)))))
    elif period_ns <= 0:
        raise ValueError(f"period_ns must be positive, got {period_ns}")
    if shift_ns is None:
        shift_ns = stamp_shift_ns(response, period_ns)
    ts = t - shift_ns
    # The sensor's memory sizes energy.py's response term, as for the meter (SensorModel.memory_ns).
    memory_ns = 0 if response is None else int(response.memory_ns())
    window = energy.integrate_window(ts, p, a, b, period_ns=period_ns, sensor_tau_ns=memory_ns)
    clipped = timeline.clip(a, b)
    keys = group_keys(clipped, group_by)
    notes: list[str] = []
    if timeline.dropped:
        notes.append(f"the tracer dropped {timeline.dropped} activity records: their time counts as idle")

    recon = _Reconstruction(ts, p, period_ns, a, b)
    occ = _Occupancy(clipped.start_ns, clipped.end_ns, a, b)
    if method == "overlap":
        result = _overlap(clipped, keys, recon, occ, window)
        durations = clipped.end_ns - clipped.start_ns
        short = float(durations[durations < 2 * period_ns].sum())
        if short > 0.1 * float(durations.sum()):
            notes.append(
                f"{100 * short / float(durations.sum()):.0f} % of the kernel time is in calls shorter than 2 sample "
                f"periods ({2 * period_ns / 1e6:.0f} ms): the overlap estimator smears their energy across classes "
                "(its uncertainty does not include this); method='model' resolves them"
            )
    else:
        assert response is not None
        result = _model(timeline, clipped, keys, group_by, t, p, a, b, period_ns, response, occ, window, notes)
    rows, kernel_j, idle_w, class_w, rms_w, n_used = result
    return Attribution(
        method=method, start_ns=a, stop_ns=b, rows=rows, energy_j=window.energy_j,
        uncertainty_j=window.uncertainty_j, shift_ns=shift_ns, idle_power_w=idle_w, class_power_w=class_w,
        residual_rms_w=rms_w, n_samples=n_used if method == "model" else window.n_samples,
        dropped=timeline.dropped, notes=tuple(notes), kernel_energy_j=_readonly(kernel_j), timeline=clipped,
    )


# -- shared pieces ---------------------------------------------------------------------------------------------------


def _window(start_ns: int, stop_ns: int) -> tuple[int, int]:
    try:
        a, b = operator.index(start_ns), operator.index(stop_ns)
    except TypeError:
        raise ValueError(f"start_ns and stop_ns must be integer ns, got {start_ns!r}, {stop_ns!r}") from None
    if a > b:
        raise ValueError(f"start_ns ({a}) is after stop_ns ({b})")
    return a, b


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def group_keys(timeline: KernelTimeline, group_by: str) -> np.ndarray:
    """The row key of every record: its name, or its name and grid (``"name <<<gx,gy,gz>>>"``) for name+grid."""
    if group_by == "name" or timeline.grid is None:
        return timeline.name
    keys = np.empty(len(timeline), dtype=object)
    keys[:] = [f"{n} <<<{g}>>>" for n, g in zip(timeline.name.tolist(), timeline.grid.tolist(), strict=True)]
    return keys


class _Reconstruction:
    """energy.py's piecewise-constant power over ``[a, b]``: segments that tile the window, each with a power, a
    flag saying whether a reading covers it, and the reading's index (-1 for gaps and the ends)."""

    def __init__(self, ts: np.ndarray, p: np.ndarray, period_ns: int, a: int, b: int) -> None:
        n = ts.size
        max_iv = 2.5 * period_ns  # energy.py's default gap threshold, with the same period
        prev = np.concatenate(([ts[0] - period_ns], ts[:-1]))
        gap = np.concatenate(([False], np.diff(ts) > max_iv))
        cov_lo = np.where(gap, np.maximum(prev, ts - period_ns), prev)
        gap_p = 0.5 * (np.concatenate(([p[0]], p[:-1])) + p)
        big = np.iinfo(np.int64).max // 4
        lo = np.concatenate((cov_lo, prev[gap], [-big], [ts[-1]]))
        hi = np.concatenate((ts, cov_lo[gap], [ts[0] - period_ns], [big]))
        power = np.concatenate((p, gap_p[gap], [p[0]], [p[-1]]))
        # How far a filled stretch may be off (energy.py's gap and end terms): half the neighbours' step inside a
        # gap; at the ends nothing bounds the power, "anywhere between 0 and twice the value" (the value itself).
        d = np.abs(np.diff(p))
        fill = np.concatenate((np.zeros(n), np.concatenate(([0.0], d))[gap] / 2, [abs(p[0])], [abs(p[-1])]))
        covered = np.concatenate((np.ones(n, bool), np.zeros(int(gap.sum()) + 2, bool)))
        sample = np.concatenate((np.arange(n), np.full(int(gap.sum()) + 2, -1)))
        lo, hi = np.clip(lo, a, b), np.clip(hi, a, b)
        keep = hi > lo
        order = np.argsort(lo[keep], kind="stable")
        self.lo = lo[keep][order]
        self.hi = hi[keep][order]
        self.power_w = power[keep][order]
        self.covered = covered[keep][order]
        self.sample = sample[keep][order]
        self.fill_error_w = fill[keep][order]
        # How much the true power may vary inside a reading's interval: its largest step to a neighbour.
        self.spread_w = np.maximum(np.concatenate(([0.0], d)), np.concatenate((d, [0.0])))

    @property
    def length_ns(self) -> np.ndarray:
        return self.hi - self.lo


class _Occupancy:
    """The shared busy time: at an instant with ``n`` records running, each holds ``1/n`` of it.

    ``edges`` are every record edge plus the window's; ``n_running[i]`` counts records running on
    ``[edges[i], edges[i+1])``. ``share_ns(lo, hi)`` integrates ``1/n`` over busy time between any two edges.
    """

    def __init__(self, start_ns: np.ndarray, end_ns: np.ndarray, a: int, b: int) -> None:
        self.start_ns, self.end_ns = start_ns, end_ns
        self.edges = np.unique(np.concatenate(([a, b], start_ns, end_ns)))
        s = np.sort(start_ns)
        e = np.sort(end_ns)
        at = self.edges[:-1]
        self.n_running = np.searchsorted(s, at, side="right") - np.searchsorted(e, at, side="right")

    def weights(self, extra_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Refine the edges with ``extra_edges``; return (edges, n_running, dt_ns) on the refined grid."""
        edges = np.unique(np.concatenate((self.edges, extra_edges)))
        idx = np.searchsorted(self.edges, edges[:-1], side="right") - 1
        return edges, self.n_running[idx], np.diff(edges).astype(np.float64)


def _rows(
    keys: np.ndarray, per_kernel_j: np.ndarray, durations_ns: np.ndarray, class_unc_j: dict[str, float],
    idle_time_ns: float, idle_j: float, idle_unc_j: float, unattributed_j: float, unattributed_unc_j: float,
    window_j: float,
) -> tuple[KernelEnergy, ...]:
    names, inverse = np.unique(keys.astype(str), return_inverse=True) if keys.size else (np.array([], str), keys)
    calls = np.bincount(inverse, minlength=names.size) if keys.size else np.zeros(0, int)
    time_ns = np.bincount(inverse, weights=durations_ns, minlength=names.size) if keys.size else np.zeros(0)
    e_j = np.bincount(inverse, weights=per_kernel_j, minlength=names.size) if keys.size else np.zeros(0)

    def row(name: str, n: int, t_ns: float, e: float, u: float) -> KernelEnergy:
        return KernelEnergy(
            name=name, calls=int(n), time_s=t_ns / _NS_PER_S, energy_j=float(e),
            mean_power_w=float(e) / (t_ns / _NS_PER_S) if t_ns > 0 else math.nan,
            share=float(e) / window_j if window_j else math.nan, uncertainty_j=float(u),
        )

    out = [row(str(nm), calls[i], time_ns[i], e_j[i], class_unc_j.get(str(nm), 0.0)) for i, nm in enumerate(names)]
    out.sort(key=lambda r: r.energy_j, reverse=True)
    out.append(row(IDLE, 0, idle_time_ns, idle_j, idle_unc_j))
    out.append(row(UNATTRIBUTED, 0, 0.0, unattributed_j, unattributed_unc_j))
    return tuple(out)


# -- overlap -----------------------------------------------------------------------------------------------------------


def _overlap(clipped: KernelTimeline, keys: np.ndarray, recon: _Reconstruction, occ: _Occupancy,
             window: energy.WindowEnergy):
    edges, n_run, dt = occ.weights(np.concatenate((recon.lo, recon.hi)))
    seg = np.searchsorted(recon.lo, edges[:-1], side="right") - 1
    power = recon.power_w[seg]
    covered = recon.covered[seg]
    busy = n_run > 0
    # Cumulative energy credited to one running record, W*ns, and its occupancy (1/n time), ns.
    per_record = np.where(busy & covered, power * dt / np.maximum(n_run, 1), 0.0)
    cum_e = np.concatenate(([0.0], np.cumsum(per_record)))
    cum_occ = np.concatenate(([0.0], np.cumsum(np.where(busy, dt / np.maximum(n_run, 1), 0.0))))
    i0 = np.searchsorted(edges, clipped.start_ns)
    i1 = np.searchsorted(edges, clipped.end_ns)
    kernel_wns = cum_e[i1] - cum_e[i0]
    idle_mask = ~busy & covered
    idle_wns = float(np.sum(power * dt * idle_mask))
    unattributed_wns = float(np.sum(power * dt * ~covered))
    idle_time_ns = float(np.sum(dt * ~busy))

    # Resolution term per (covered segment, row): min(f, 1 - f) * L * spread / 2, in quadrature over segments.
    cov_seg = np.flatnonzero(recon.covered)
    seg_len = recon.length_ns.astype(np.float64)
    spread = np.zeros(recon.lo.size)
    spread[cov_seg] = recon.spread_w[recon.sample[cov_seg]]
    names: np.ndarray = np.unique(keys.astype(str)) if keys.size else np.array([], dtype=str)
    inverse = np.searchsorted(names, keys.astype(str)) if keys.size else np.zeros(0, np.int64)
    class_unc: dict[str, float] = {}
    if keys.size:
        # Cut each record at segment boundaries: the pieces give each row's occupancy inside each segment.
        first = np.searchsorted(recon.lo, clipped.start_ns, side="right") - 1
        last = np.maximum(first, np.searchsorted(recon.lo, clipped.end_ns, side="left") - 1)
        count = last - first + 1
        rec = np.repeat(np.arange(len(clipped)), count)
        pseg = np.repeat(first, count) + (np.arange(rec.size) - np.repeat(np.cumsum(count) - count, count))
        lo = np.maximum(clipped.start_ns[rec], recon.lo[pseg])
        hi = np.minimum(clipped.end_ns[rec], recon.hi[pseg])
        occ_ns = cum_occ[np.searchsorted(edges, hi)] - cum_occ[np.searchsorted(edges, np.minimum(lo, hi))]
        key = pseg.astype(np.int64) * len(names) + inverse[rec]
        ukey, kinv = np.unique(key, return_inverse=True)
        f = np.bincount(kinv, weights=occ_ns) / seg_len[ukey // len(names)]
        s = ukey // len(names)
        term = np.minimum(f, 1 - f).clip(0) * seg_len[s] * spread[s] / 2 * recon.covered[s]
        var = np.bincount(ukey % len(names), weights=term**2, minlength=len(names))
        class_unc = {str(nm): math.sqrt(v) / _NS_PER_S for nm, v in zip(names, var, strict=True)}
    idle_seg = np.bincount(seg, weights=dt * ~busy, minlength=recon.lo.size)
    f_idle = idle_seg / np.maximum(seg_len, 1)
    idle_unc = math.sqrt(float(np.sum((np.minimum(f_idle, 1 - f_idle) * seg_len * spread / 2) ** 2))) / _NS_PER_S
    # Uncovered stretches: the filled power's possible error over their length, in quadrature.
    unc_seg = np.flatnonzero(~recon.covered)
    unattributed_unc = math.sqrt(float(np.sum((seg_len[unc_seg] * recon.fill_error_w[unc_seg]) ** 2))) / _NS_PER_S

    kernel_j = kernel_wns / _NS_PER_S
    rows = _rows(keys, kernel_j, (clipped.end_ns - clipped.start_ns).astype(np.float64), class_unc, idle_time_ns,
                 idle_wns / _NS_PER_S, idle_unc, unattributed_wns / _NS_PER_S, unattributed_unc, window.energy_j)
    idle_cov_ns = float(np.sum(dt * idle_mask))
    idle_w = idle_wns / idle_cov_ns if idle_cov_ns > 0 else math.nan
    class_w = {r.name: r.mean_power_w for r in rows if r.name not in (IDLE, UNATTRIBUTED)}
    return rows, kernel_j, idle_w, class_w, math.nan, window.n_samples


# -- model -------------------------------------------------------------------------------------------------------------


def _model(timeline: KernelTimeline, clipped: KernelTimeline, keys: np.ndarray, group_by: str, t: np.ndarray,
           p: np.ndarray, a: int, b: int, period_ns: int, response: Response, occ: _Occupancy,
           window: energy.WindowEnergy, notes: list[str]):
    fit = (t >= a + response.delay_ns + response.shape_ns) & (t <= b + response.delay_ns)
    tf, pf = t[fit], p[fit]
    m = int(tf.size)
    if m < 3:
        raise WindowTooShortError(
            f"method='model' needs at least 3 readings stamped in [start + delay + shape, stop + delay] "
            f"({response.describe()}), got {m}: the window is too short"
        )
    durations = (clipped.end_ns - clipped.start_ns).astype(np.float64)
    names, inv = np.unique(keys.astype(str), return_inverse=True) if keys.size else (np.array([], str), keys)
    support = dict(zip(names.tolist(), union_by_group(inv, clipped.start_ns, clipped.end_ns, names.size), strict=True))
    min_support = _MIN_SUPPORT_PERIODS * period_ns
    small = sorted(n for n, s in support.items() if s < min_support)
    big = sorted((n for n in support if support[n] >= min_support), key=lambda n: support[n], reverse=True)
    # Keep the fit over-determined: columns (idle, classes, [other]) must leave at least 2 degrees of freedom.
    while big and 1 + len(big) + (1 if small else 0) > m - 2:
        small.append(big.pop())
    if small:
        notes.append(
            f"{len(small)} kernel classes with less than {_MIN_SUPPORT_PERIODS:g} sample periods of busy time "
            f"(or more than {m} readings can fit) were merged into {OTHER}: " + ", ".join(small[:5])
            + (", ..." if len(small) > 5 else "")
        )
    classes = big + ([OTHER] if small else [])
    column = {c: j for j, c in enumerate(classes)}
    other = column.get(OTHER, -1)
    # Class column of every record: of the clipped timeline (energy) and of the whole one (the response sees
    # records outside the window too, which explain readings near the edges).
    cls = np.array([column.get(k, other) for k in names.tolist()], dtype=np.int64)[inv] if keys.size else inv
    all_names, all_inv = np.unique(group_keys(timeline, group_by).astype(str), return_inverse=True)
    all_cls = np.array([column.get(k, other if k in support else -1) for k in all_names.tolist()],
                       dtype=np.int64)[all_inv] if len(timeline) else np.zeros(0, np.int64)

    x = np.empty((m, 1 + len(classes)))
    x[:, 0] = 1.0
    t_rel = (tf - a).astype(np.float64) - response.delay_ns

    def response_to(sel: np.ndarray) -> np.ndarray:
        sched = Schedule(np.stack([timeline.start_ns[sel], timeline.end_ns[sel]], axis=1), a)
        return np.clip(sched.filtered(response.kind, response.shape_ns, t_rel), 0.0, 1.0)

    order = np.argsort(all_cls, kind="stable")
    bounds = np.searchsorted(all_cls[order], np.arange(len(classes) + 1))
    for j in range(len(classes)):
        x[:, 1 + j] = response_to(order[bounds[j] : bounds[j + 1]])
    busy_any = response_to(np.flatnonzero(all_cls >= 0))
    untraced_col = column.get(UNTRACED, -1) + 1  # 0: none
    fit_rows = np.ones(m, bool)
    if untraced_col:
        fit_rows = x[:, untraced_col] <= _UNTRACED_REACH
        if int(fit_rows.sum()) < len(classes) + 2:  # columns without [untraced], plus 2 degrees of freedom
            fit_rows[:] = True
            untraced_col = 0
            notes.append(f"too few readings outside the reach of the untraced time to fit without it: {UNTRACED} "
                         "was fitted as a class")
    if untraced_col:
        cols = np.flatnonzero(np.arange(1 + len(classes)) != untraced_col)
        c_fit, _, sigma2, cov_fit, common_w = _fit_with_prior(x[fit_rows][:, cols], pf[fit_rows], busy_any[fit_rows])
        coef = np.zeros(1 + len(classes))
        coef[cols] = c_fit
        cov = np.zeros((coef.size, coef.size))
        cov[np.ix_(cols, cols)] = cov_fit
    else:
        coef, _, sigma2, cov, common_w = _fit_with_prior(x, pf, busy_any)
    resid = (pf - x @ coef)[fit_rows]
    m_fit = int(fit_rows.sum())

    idle_w = float(coef[0])
    k = len(classes)
    busy_in = union_by_group(cls, clipped.start_ns, clipped.end_ns, k)  # union busy time per class, ns
    dur_c = np.bincount(cls, weights=durations, minlength=k) if k else np.zeros(0)
    edges, n_run, dt = occ.weights(np.empty(0, dtype=np.int64))
    cum_occ = np.concatenate(([0.0], np.cumsum(np.where(n_run > 0, dt / np.maximum(n_run, 1), 0.0))))
    rec_occ = cum_occ[np.searchsorted(edges, clipped.end_ns)] - cum_occ[np.searchsorted(edges, clipped.start_ns)]
    occ_c = np.bincount(cls, weights=rec_occ, minlength=k) if k else np.zeros(0)
    idle_time_ns = float(np.sum(dt * (n_run == 0)))

    # A class's union busy time is spread over its calls by duration (equal to the duration without overlap).
    scale = np.divide(busy_in, dur_c, out=np.zeros(k), where=dur_c > 0)
    kernel_j = (idle_w * rec_occ + (coef[1:][cls] * scale[cls] * durations if k else 0.0)) / _NS_PER_S
    g = np.zeros((k, 1 + k))  # d(energy_c)/d(coef), J per W
    g[:, 0] = occ_c / _NS_PER_S
    g[np.arange(k), 1 + np.arange(k)] = busy_in / _NS_PER_S
    class_unc = {c: math.sqrt(max(0.0, float(g[j] @ cov @ g[j]))) for j, c in enumerate(classes)}
    # The prior is doing the work where a class's power is still uncertain by a quarter of the prior's width; say so
    # when such classes hold a noticeable share of the energy (a tiny [other] always leans on it, harmlessly).
    leaning = np.sqrt(np.maximum(np.diag(cov)[1:], 0.0)) > 0.25 * _PRIOR_SCALE_W
    class_j = np.bincount(cls, weights=kernel_j, minlength=k) if k else np.zeros(0)
    if not math.isnan(common_w) and float(class_j[leaning].sum()) > 0.05 * window.energy_j:
        notes.append(f"the readings cannot tell some kernel classes apart (they always run in the same mix, faster "
                     f"than the sensor's {response.describe()} resolves): their powers stay near the common busy "
                     f"power {common_w:.0f} W above idle, within a prior of +-{_PRIOR_SCALE_W:.0f} W that their "
                     "uncertainties include")
    total_g = np.concatenate(([(b - a) / _NS_PER_S], busy_in / _NS_PER_S))
    idle_j = idle_w * idle_time_ns / _NS_PER_S
    idle_unc = math.sqrt(max(0.0, float(cov[0, 0]))) * idle_time_ns / _NS_PER_S
    unattributed_j = window.energy_j - (float(kernel_j.sum()) + idle_j)
    unattributed_unc = math.hypot(window.uncertainty_j, math.sqrt(max(0.0, float(total_g @ cov @ total_g))))
    if untraced_col:
        # [untraced] takes what is left, spread over its stretches by their time (module docstring).
        mine = cls == untraced_col - 1
        kernel_j[mine] += unattributed_j * durations[mine] / durations[mine].sum()
        class_unc[UNTRACED] = unattributed_unc
        unattributed_j, unattributed_unc = 0.0, 0.0
    rms_w = math.sqrt(float(resid @ resid) / m_fit)
    left_out = f", {m - m_fit} within reach of untraced time left out" if m_fit < m else ""
    notes.append(f"fit of {k} classes + idle over {m_fit} readings ({response.describe()}{left_out}): "
                 f"idle {idle_w:.1f} W, residual rms {rms_w:.2f} W")
    cls_names = np.array(classes, dtype=object)[cls] if keys.size else keys
    rows = _rows(cls_names, kernel_j, durations, class_unc, idle_time_ns, idle_j, idle_unc, unattributed_j,
                 unattributed_unc, window.energy_j)
    class_w = {c: idle_w + float(coef[1 + j]) for j, c in enumerate(classes)}
    if untraced_col:
        class_w[UNTRACED] = next(r.mean_power_w for r in rows if r.name == UNTRACED)
    return rows, kernel_j, idle_w, class_w, rms_w, m_fit


def _fit_with_prior(x: np.ndarray, p: np.ndarray, busy_any: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, float]:
    """NNLS of ``p ~ x @ coef`` (column 0 idle, the others class increments), with a weak prior on the increments.

    A periodic workload (a model's forward pass repeated every few ms) runs its kernel classes in the same proportions
    in every stretch the sensor averages over, so their responses are nearly proportional and the plain fit is free
    to trade one class's power for another's: on resnet50 it credited an elementwise kernel 4266 W on a 700 W board.
    The prior says "a class draws what the GPU draws when busy at all, give or take _PRIOR_SCALE_W", with that common
    increment fitted first (``busy_any`` is the response to every class's busy time at once). Its weight, the noise
    variance over the prior variance, is far below what the readings say about any identifiable class, so it only
    decides the directions the readings leave open, and the covariance includes it (an unresolved class gets an
    uncertainty of the prior's size, not a false precision). Returns coef, free, sigma2, covariance and the common
    increment."""
    m, n = x.shape
    coef0, free0 = nnls(x, p)
    resid0 = p - x @ coef0
    sigma2 = float(resid0 @ resid0) / max(1, m - int(free0.sum()))
    if n <= 2:
        return coef0, free0, sigma2, _covariance(x, free0, sigma2), math.nan
    common, _ = nnls(np.column_stack([np.ones(m), busy_any]), p)
    root_w = math.sqrt(max(sigma2, 1e-12)) / _PRIOR_SCALE_W
    prior_rows = np.zeros((n - 1, n))
    prior_rows[:, 1:] = root_w * np.eye(n - 1)
    xa = np.vstack([x, prior_rows])
    pa = np.concatenate([p, np.full(n - 1, root_w * common[1])])
    coef, free = nnls(xa, pa)
    return coef, free, sigma2, _covariance(xa, free, sigma2), float(common[1])


def union_by_group(group: np.ndarray, start_ns: np.ndarray, end_ns: np.ndarray, n_groups: int) -> np.ndarray:
    """Length of the union of each group's intervals, ns (float64 array of ``n_groups``)."""
    if start_ns.size == 0:
        return np.zeros(n_groups)
    order = np.lexsort((start_ns, group))
    g, s, e = group[order], start_ns[order], end_ns[order]
    # A running maximum of the ends that restarts at each group (one pass per group: there are few).
    new = np.concatenate(([True], g[1:] != g[:-1]))
    heads = np.flatnonzero(new)
    run_end = np.empty(e.size, dtype=np.int64)
    for i0, i1 in zip(heads, np.concatenate((heads[1:], [e.size])), strict=True):
        run_end[i0:i1] = np.maximum.accumulate(e[i0:i1])
    lo = np.iinfo(np.int64).min
    prev_end = np.where(new, lo, np.concatenate(([lo], run_end[:-1])))
    # Each interval adds what lies beyond the running end of the earlier intervals of its group.
    added = np.clip(e - np.maximum(s, prev_end), 0, None)
    return np.bincount(g, weights=added.astype(np.float64), minlength=n_groups)


def _covariance(x: np.ndarray, free: np.ndarray, sigma2: float) -> np.ndarray:
    n = x.shape[1]
    cov = np.zeros((n, n))
    full = sigma2 * np.linalg.pinv(x.T @ x)
    held = np.flatnonzero(~free)
    cov[held, held] = np.diag(full)[held]
    f = np.flatnonzero(free)
    if f.size:
        cov[np.ix_(f, f)] = sigma2 * np.linalg.pinv(x[:, f].T @ x[:, f])
    return cov


def nnls(a: ArrayLike, y: ArrayLike, *, max_iter: int | None = None, tol: float | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative least squares, ``min ||a x - y||`` subject to ``x >= 0`` (Lawson & Hanson 1974, active set).

    Returns ``(x, free)`` where ``free`` marks the variables not held at 0 (the passive set). Raises ValueError for
    mismatched shapes or non-finite inputs and RuntimeError if it does not converge in ``max_iter`` (default
    ``3 * n``) outer iterations.
    """
    a = np.asarray(a, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or y.ndim != 1 or a.shape[0] != y.size:
        raise ValueError(f"nnls needs a of shape (m, n) and y of shape (m,), got {a.shape} and {y.shape}")
    if not (np.isfinite(a).all() and np.isfinite(y).all()):
        raise ValueError("nnls inputs must be finite")
    m, n = a.shape
    if tol is None:
        tol = 10 * np.finfo(float).eps * max(m, n) * max(1.0, float(np.abs(a).max(initial=0.0))) * max(
            1.0, float(np.abs(y).max(initial=0.0)))
    max_iter = 3 * n if max_iter is None else max_iter
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)
    w = a.T @ (y - a @ x)
    for _ in range(max_iter):
        if free.all() or w[~free].max(initial=-np.inf) <= tol:
            return x, free
        j = int(np.argmax(np.where(free, -np.inf, w)))
        free[j] = True
        while True:
            z = np.zeros(n)
            z[free] = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
            if (z[free] > 0).all():
                x = z
                break
            if z[j] <= 0 and x[j] == 0:
                # Rounding: the most promising variable cannot move off 0 after all, so x is optimal.
                free[j] = False
                return x, free
            # Step from x toward z until the first free variable reaches 0, then hold it there.
            neg = free & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            free &= x > tol
            x[~free] = 0.0
            if not free.any():
                break
        w = a.T @ (y - a @ x)
    raise RuntimeError(f"nnls did not converge in {max_iter} iterations")
