"""Sensor response models: what a power reading is, given when the GPU was busy.

A GPU alternating between two power levels draws ``low + (high - low) * u(t)``, where ``u`` is the busy indicator
(1 inside the commanded busy intervals, 0 outside). A power source does not report ``u`` itself but a filtered,
delayed version of it, sampled at its stamps. Two filters cover what measurement-facts §2 describes:

* ``"boxcar"``: the reading stamped ``t`` is the mean of the input over ``[t - delay - width, t - delay]``
  (most GPUs: a 10 ms .. 1 s averaging window, shorter or longer than the update period, with a lag).
* ``"lowpass"``: a first-order low-pass with time constant ``tau`` followed by a pure delay (the H100 SXM sample
  stream: tau ≈ 11.5 ms, sampled every ~20 ms).

Because both filters are linear and preserve a constant, a reading is ``low + (high - low) * y(t)`` where ``y`` is
the filter's output for ``u`` (:func:`filtered_indicator`), so the power levels enter a fit linearly.

Evaluation is analytic, hence exact to float rounding and fast: the boxcar output is a difference of the cumulative
busy time (piecewise linear, found by binary search); the low-pass state is advanced exactly from edge to edge with
the discrete factor ``exp(-dt / tau)`` (one pass over the edges) and from the last edge to each stamp. Before the
first busy interval the GPU is taken to have been idle forever (``y = 0``).

Times are CLOCK_MONOTONIC nanoseconds; arrays of stamps are integers, durations of the model floats (ns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "KINDS",
    "Response",
    "Schedule",
    "amplitude_ratio",
    "filtered_indicator",
    "phase_locked_bias",
    "predicted_reading_w",
    "square_wave_response",
]

KINDS = ("boxcar", "lowpass")


@dataclass(frozen=True)
class Response:
    """A sensor response: a filter of the power input followed by a pure delay.

    Attributes:
        kind: ``"boxcar"`` (mean of the input over ``[t - delay - width, t - delay]``) or ``"lowpass"``
            (first-order, time constant ``tau``, then a pure delay).
        shape_ns: boxcar width or low-pass tau, ns, > 0.
        delay_ns: pure delay, ns (may be negative: a source may stamp its readings before the window it averages
            ends).
    """

    kind: str
    shape_ns: float
    delay_ns: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown response kind {self.kind!r}: expected one of {KINDS}")
        if not (math.isfinite(self.shape_ns) and self.shape_ns > 0):
            raise ValueError(f"shape_ns must be a positive finite number of ns, got {self.shape_ns!r}")
        if not math.isfinite(self.delay_ns):
            raise ValueError(f"delay_ns must be finite, got {self.delay_ns!r}")

    def group_delay_ns(self) -> float:
        """Centre of mass of the impulse response, ns: boxcar ``delay + width / 2``, low-pass ``delay + tau``."""
        if self.kind == "boxcar":
            return self.delay_ns + self.shape_ns / 2
        return self.delay_ns + self.shape_ns

    def memory_ns(self) -> float:
        """How far the response spreads a power step over time, ns: low-pass tau, half a boxcar (delay excluded)."""
        return self.shape_ns if self.kind == "lowpass" else self.shape_ns / 2

    def describe(self) -> str:
        """One line for reports, e.g. ``"lowpass tau 11.5 ms, delay 2.0 ms"``."""
        name = "width" if self.kind == "boxcar" else "tau"
        return f"{self.kind} {name} {self.shape_ns / 1e6:.3g} ms, delay {self.delay_ns / 1e6:.3g} ms"


def stamp_shift_ns(response: Response | None, sample_period_ns: float, *, polled: bool = False) -> int:
    """How far to move reading stamps back before integrating them as "each reading covers the interval since the
    previous one" (energy.py): the response's group delay minus the half period by which that interval's centre
    already precedes the stamp. ``polled``: readings stamped when wattscope read them (the instant and average
    fields) lag their value's change by half a polling period on average, which cancels that half period.
    0 without a response."""
    if response is None:
        return 0
    half_period_ns = 0.0 if polled else sample_period_ns / 2
    return int(round(response.group_delay_ns() - half_period_ns))


def _as_busy(busy_ns: ArrayLike) -> np.ndarray:
    busy = np.asarray(busy_ns)
    if busy.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if busy.ndim != 2 or busy.shape[1] != 2:
        raise ValueError(f"busy_ns must have shape (n, 2) of [start_ns, end_ns), got shape {busy.shape}")
    if busy.dtype.kind not in "iu":
        raise ValueError(f"busy_ns must be integer nanoseconds, got dtype {busy.dtype}")
    busy = busy.astype(np.int64)
    bad = np.flatnonzero(busy[:, 1] < busy[:, 0])
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"busy interval {i} ends before it starts: [{int(busy[i, 0])}, {int(busy[i, 1])})")
    return busy


def _as_stamps(stamps_ns: ArrayLike) -> np.ndarray:
    stamps = np.asarray(stamps_ns)
    if stamps.ndim != 1:
        raise ValueError(f"stamps_ns must be 1-D, got shape {stamps.shape}")
    if stamps.size and stamps.dtype.kind not in "iu":
        raise ValueError(f"stamps_ns must be integer nanoseconds, got dtype {stamps.dtype}")
    return stamps.astype(np.int64)


class Schedule:
    """A busy schedule prepared for repeated evaluation of filter outputs (the fit evaluates thousands).

    Times are float ns relative to ``origin_ns`` (an int64 on CLOCK_MONOTONIC), which keeps them exact in float64
    (monotonic ns since boot exceed 2**53 after ~104 days). Overlapping or touching busy intervals are merged,
    empty ones dropped.
    """

    def __init__(self, busy_ns: ArrayLike, origin_ns: int) -> None:
        busy = _as_busy(busy_ns)
        busy = busy[busy[:, 1] > busy[:, 0]]
        busy = busy[np.argsort(busy[:, 0], kind="stable")]
        if busy.shape[0] > 1:
            # Merge: an interval starts a new group unless it begins at or before the running end of the previous.
            run_end = np.maximum.accumulate(busy[:, 1])
            new = np.concatenate(([True], busy[1:, 0] > run_end[:-1]))
            group = np.cumsum(new) - 1
            starts = busy[new, 0]
            ends = np.zeros(starts.size, dtype=np.int64)
            np.maximum.at(ends, group, busy[:, 1])
            busy = np.stack([starts, ends], axis=1)
        self.origin_ns = int(origin_ns)
        rel = (busy - self.origin_ns).astype(np.float64)
        self.starts = rel[:, 0]
        self.ends = rel[:, 1]
        # Busy time accumulated before each interval starts, for the boxcar's cumulative busy function.
        self._busy_before = np.concatenate(([0.0], np.cumsum(self.ends - self.starts)))
        self._edges = rel.reshape(-1)  # start0, end0, start1, ... (strictly increasing after the merge)
        self._level_after = np.tile([1.0, 0.0], self.starts.size)
        self._tau_ns = math.nan
        self._edge_state = np.empty(0)

    @property
    def n_intervals(self) -> int:
        return int(self.starts.size)

    def busy_time(self, t_ns: np.ndarray) -> np.ndarray:
        """Busy time, ns, accumulated from the origin's far past up to each time ``t_ns`` (relative ns)."""
        k = np.searchsorted(self.starts, t_ns, side="right") - 1
        kc = np.maximum(k, 0)
        inside = np.clip(t_ns - self.starts[kc], 0.0, (self.ends - self.starts)[kc]) if self.n_intervals else 0.0
        return np.where(k >= 0, self._busy_before[kc] + inside, 0.0)

    def _lowpass_edge_state(self, tau_ns: float) -> np.ndarray:
        # The low-pass state just after each edge, advanced exactly edge to edge. A Python pass over the edges:
        # a square wave of 60 s at 10 ms has 12 000 of them (~2 ms); the fit reuses it for every delay it tries.
        if tau_ns != self._tau_ns:
            decay = np.exp(-np.diff(self._edges) / tau_ns).tolist()
            state = np.empty(self._edges.size)
            y = 0.0
            if state.size:
                state[0] = 0.0
                for k, a in enumerate(decay):
                    # The level between edge k and k + 1 is 1 after a start (even k), 0 after an end.
                    y = y * a + (1.0 - a) if k % 2 == 0 else y * a
                    state[k + 1] = y
            self._edge_state = state
            self._tau_ns = tau_ns
        return self._edge_state

    def filtered(self, kind: str, shape_ns: float, t_ns: np.ndarray) -> np.ndarray:
        """The delay-free filter output for the busy indicator at times ``t_ns`` (float ns relative to the origin;
        any shape). Subtract the delay from the times to apply it."""
        t = np.asarray(t_ns, dtype=np.float64)
        if self.n_intervals == 0:
            return np.zeros(t.shape)
        if kind == "boxcar":
            return (self.busy_time(t) - self.busy_time(t - shape_ns)) / shape_ns
        if kind == "lowpass":
            state = self._lowpass_edge_state(shape_ns)
            k = np.searchsorted(self._edges, t, side="right") - 1
            kc = np.maximum(k, 0)
            level = self._level_after[kc]
            # Times before the first edge read 0 below; zeroing their age keeps exp() from overflowing meanwhile.
            age = np.where(k >= 0, t - self._edges[kc], 0.0)
            y = level + (state[kc] - level) * np.exp(-age / shape_ns)
            return np.where(k >= 0, y, 0.0)
        raise ValueError(f"unknown response kind {kind!r}: expected one of {KINDS}")


def filtered_indicator(
    busy_ns: ArrayLike, stamps_ns: ArrayLike, response: Response, *, resolution_ns: int = 50_000
) -> np.ndarray:
    """The response's output, in [0, 1], to the busy indicator at each stamp.

    Args:
        busy_ns: commanded busy intervals, int array of shape (n, 2), ``[start_ns, end_ns)`` on CLOCK_MONOTONIC.
        stamps_ns: reading stamps, 1-D int array, ns (any order).
        response: the sensor response.
        resolution_ns: the largest acceptable time discretisation, ns (> 0). The evaluation is analytic, so it
            meets any resolution; the argument is validated and kept so that callers can state the accuracy they
            need.

    Returns:
        float64 array shaped like ``stamps_ns``.
    """
    if not resolution_ns > 0:
        raise ValueError(f"resolution_ns must be > 0, got {resolution_ns!r}")
    stamps = _as_stamps(stamps_ns)
    busy = _as_busy(busy_ns)
    if stamps.size == 0:
        return np.zeros(0)
    origin = int(busy[:, 0].min()) if busy.size else int(stamps.min())
    schedule = Schedule(busy, origin)
    t = (stamps - origin).astype(np.float64) - response.delay_ns
    return np.clip(schedule.filtered(response.kind, response.shape_ns, t), 0.0, 1.0)


def predicted_reading_w(
    busy_ns: ArrayLike, stamps_ns: ArrayLike, response: Response, low_w: float, high_w: float
) -> np.ndarray:
    """Readings the response predicts at each stamp, W, for a GPU drawing ``low_w`` idle and ``high_w`` busy."""
    return low_w + (high_w - low_w) * filtered_indicator(busy_ns, stamps_ns, response)


def _check_square(period_ns: float, duty: float) -> None:
    if not (math.isfinite(period_ns) and period_ns > 0):
        raise ValueError(f"period_ns must be a positive finite number of ns, got {period_ns!r}")
    if not 0.0 < duty < 1.0:
        raise ValueError(f"duty must be strictly between 0 and 1, got {duty!r}")


def amplitude_ratio(response: Response, period_ns: float, duty: float = 0.5) -> float:
    """Steady-state peak-to-peak of the response to a square wave (busy for ``duty * period_ns`` of each period),
    divided by the input's peak-to-peak. The delay does not change it.

    Low-pass (on ``T1``, off ``T0``, ``x = exp(-T / tau)``): the output climbs during ``T1`` and decays during
    ``T0``; the periodic solution gives ``(1 - x1)(1 - x0) / (1 - x1 x0)``, which is ``tanh(period / (4 tau))`` at
    duty 0.5. Boxcar of width ``W = q * period + r``: the window always holds ``q`` whole periods, and the busy time
    of the remaining length ``r`` ranges from ``max(0, r - T0)`` to ``min(r, T1)``, so the ratio is their difference
    over ``W`` (1 when ``W`` fits inside both the busy and the idle part, 0 when ``W`` is a multiple of the period).
    """
    _check_square(period_ns, duty)
    on_ns = duty * period_ns
    off_ns = period_ns - on_ns
    if response.kind == "lowpass":
        tau = response.shape_ns
        # expm1 keeps the ratio accurate when the period is tiny compared with tau.
        a1 = -math.expm1(-on_ns / tau)
        a0 = -math.expm1(-off_ns / tau)
        return a1 * a0 / -math.expm1(-period_ns / tau)
    width = response.shape_ns
    r = width - math.floor(width / period_ns) * period_ns
    return (min(r, on_ns) - max(0.0, r - off_ns)) / width


def square_wave_response(response: Response, period_ns: float, t_ns: ArrayLike, duty: float = 0.5) -> np.ndarray:
    """Steady-state output of the response to an endless square wave busy on ``[k * period, k * period + duty *
    period)``, at times ``t_ns`` (float ns, any shape, same origin as the wave). Used for aliasing estimates."""
    _check_square(period_ns, duty)
    on_ns = duty * period_ns
    t = np.asarray(t_ns, dtype=np.float64) - response.delay_ns
    if response.kind == "boxcar":
        width = response.shape_ns

        def busy_time(x: np.ndarray) -> np.ndarray:
            whole = np.floor(x / period_ns)
            return whole * on_ns + np.minimum(x - whole * period_ns, on_ns)

        return (busy_time(t) - busy_time(t - width)) / width
    tau = response.shape_ns
    off_ns = period_ns - on_ns
    # Periodic solution: the maximum at the end of the busy part, the minimum at the end of the idle part.
    y_max = -math.expm1(-on_ns / tau) / -math.expm1(-period_ns / tau)
    y_min = y_max * math.exp(-off_ns / tau)
    phase = t - np.floor(t / period_ns) * period_ns
    rising = 1.0 - (1.0 - y_min) * np.exp(-np.minimum(phase, on_ns) / tau)
    falling = y_max * np.exp(-np.maximum(phase - on_ns, 0.0) / tau)
    return np.where(phase < on_ns, rising, falling)


def phase_locked_bias(response: Response, period_ns: float, n_phases: int, duty: float = 0.5) -> float:
    """Worst-case bias, as a fraction of the swing, of the mean of readings that visit only ``n_phases`` equally
    spaced phases of a square wave's steady-state response (what a sample clock at ``period * q / n_phases``
    does), over every starting phase: ``max over phi of |mean_j y(phi + j * period / n_phases) - duty|``.

    The starting phase is searched on a grid of ``max(16, 256 // n_phases)`` points over ``period / n_phases``
    (shifting by that permutes the phases); the bias of a low-pass's cusp may be missed by ~2 % of itself.
    """
    _check_square(period_ns, duty)
    if n_phases < 1:
        raise ValueError(f"n_phases must be >= 1, got {n_phases!r}")
    spacing = period_ns / n_phases
    starts = spacing * np.arange(max(16, 256 // n_phases)) / max(16, 256 // n_phases)
    t = starts[:, None] + spacing * np.arange(n_phases)[None, :]
    return float(np.abs(square_wave_response(response, period_ns, t, duty).mean(axis=1) - duty).max())
