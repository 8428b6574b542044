"""Energy of a time window from a stream of power samples.

Units: times are int64 nanoseconds on CLOCK_MONOTONIC (``*_ns``), power is watts (``*_w``), energy is joules
(``*_j``) except the raw NVML counter, which is millijoules (``*_mj``), durations in results are seconds
(``*_s``).

Sample model
------------
Sample ``k`` reports the *mean* power over ``(t_ns[k-1], t_ns[k]]``. On an H100 the NVML sample stream
(``nvmlDeviceGetSamples``) delivers one sample about every 20 ms and behaves like a continuous first-order
low-pass (tau ~ 11.5 ms) sampled at the stamps, so "each sample is the mean since the previous one" is the
model under which the long-run integral is unbiased. The first sample's interval start is unknown; it is taken
to cover one nominal period ``period_ns`` (median stamp spacing, or the caller's value). A spacing longer than
``max_interval_ns`` (default 2.5 periods; the driver ring holds ~2.4 s, so a slow drain loses samples) is a
*gap*: the sample is taken to cover only the last period before its stamp, and the time before that is
uncovered.

The estimate is the exact integral over ``[start_ns, stop_ns]`` of a piecewise-constant reconstruction:
sample ``k``'s power over its interval, the mean of the two neighbours over a gap, the first sample's power
before the first interval and the last sample's power after the last stamp. Because it is an integral of one
fixed function, it is additive over adjacent windows, linear in power and invariant to shifting all times.
Uncovered time is filled (not dropped) so that a short outage biases the estimate less than treating it as zero
power would, and it is reported in ``gaps_ns`` / ``coverage`` so callers can reject poorly covered windows.

Uncertainty
-----------
``uncertainty_j`` is a one-sigma-like size of the estimator's error, not a rigorous bound. Contributions are
treated as independent and added in quadrature:

* Edge term (each window edge that falls strictly inside a sample interval). The estimator spreads a sample's
  energy uniformly over its interval, so when an edge splits an interval of length ``L`` into ``o`` inside and
  ``L - o`` outside, the error is ``integral over o of (p - mean)`` = ``-(integral over L-o of (p - mean))``,
  whose size is at most ``min(o, L - o) * range(p)``. The range of the true power inside the interval is
  unknown; the spread between the edge sample and its neighbour on the far side of the edge stands in for it,
  halved for a one-sigma-like value: ``min(o, L - o) * spread / 2``. (Using ``min(o, L - o)`` rather than ``o``
  makes the term vanish, as the true error does, when the edge approaches either end of the interval.) Where
  the edge sample has no neighbour outside the window (the trace ends there), the one inside stands in.
* Short windows. Below two sensor periods the window cannot be aligned to the sensor reliably (stamps lag the
  true power by a few ms and the sensor smooths over ~tau), so each edge term is raised to at least
  ``0.5 * period * spread`` (edge sample: the first/last sample overlapping the window, even when the edge
  sits on its stamp) and the reason ``"window shorter than 2 sensor periods (X ms < Y ms)"`` is listed.
* Gap term. If power stayed between the neighbours ``p1`` and ``p2`` during a gap, filling ``g`` ns of it
  with their mean is off by at most ``g * |p1 - p2| / 2``; each gap's term is that value. Before the first or
  after the last sample nothing bounds the power; ``time * |p| / 2`` says "anywhere between 0 and twice the
  adjacent value".
* Sensor-response term (``sensor_tau_ns > 0``). A first-order low-pass with time constant tau turns a power
  step ``dP`` into a response that lags it; the energy ``tau * dP`` that belongs before the step is read after
  it. When the step sits at a window edge that energy crosses the edge, so each edge contributes
  ``tau * |P_inside - P_outside|`` using the edge sample and its neighbour outside the window.

A constant trace fully covered by samples gives exactly 0 (every spread and step is 0). Reasons are listed
largest first with their size in J; they are empty exactly when ``uncertainty_j`` is 0, so a short window over
a constant trace lists nothing.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["WindowEnergy", "counter_delta_j", "integrate_window"]

_NS_PER_S = 1e9
_NS_PER_MS = 1e6
_SHORT_WINDOW_REASON = "window shorter than 2 sensor periods"


@dataclass(frozen=True, eq=False)
class WindowEnergy:
    """Energy estimate for one window ``[start_ns, stop_ns]``.

    ``eq=False`` because ``gaps_ns`` is an array (field-wise ``==`` would be ambiguous); ``gaps_ns`` is
    read-only so the object is immutable in practice as well.

    Attributes:
        energy_j: estimated energy over the window, J.
        duration_s: window length, s.
        mean_power_w: ``energy_j / duration_s``, W; nan for a zero-length window.
        peak_power_w: largest sample power among samples whose interval overlaps the window, W; nan if none.
        covered_s: window time covered by sample intervals, s (gaps and uncovered edges excluded).
        coverage: ``covered_s / duration_s`` in [0, 1]; 1.0 for a zero-length window.
        gaps_ns: int64 array of shape (n, 2), the uncovered ``[from, to)`` stretches inside the window, ns, in
            time order.
        n_samples: number of samples whose interval overlaps the window by a positive amount.
        uncertainty_j: one-sigma-like estimate of the estimator error, J, >= 0.
        uncertainty_reasons: human-readable contributors with their size in J, largest first; empty when
            ``uncertainty_j`` is 0.
    """

    energy_j: float
    duration_s: float
    mean_power_w: float
    peak_power_w: float
    covered_s: float
    coverage: float
    gaps_ns: np.ndarray
    n_samples: int
    uncertainty_j: float
    uncertainty_reasons: tuple[str, ...]


def _as_stamps(t_ns: ArrayLike, name: str) -> np.ndarray:
    """Validate stamps (ns) as a 1-D strictly increasing int64 array."""
    t = np.asarray(t_ns)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {t.shape}")
    if t.size == 0:
        raise ValueError(f"{name} is empty: need at least one sample")
    if t.dtype.kind == "u":
        if int(t.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} does not fit in int64 nanoseconds")
        t = t.astype(np.int64)
    elif t.dtype.kind == "i":
        t = t.astype(np.int64, copy=False)
    else:
        # Float stamps would silently lose ns resolution beyond 2**53 ns (~104 days of uptime).
        raise ValueError(f"{name} must be integer nanoseconds, got dtype {t.dtype}")
    if t.size > 1:
        bad = np.flatnonzero(t[1:] <= t[:-1])
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{name} must be strictly increasing: {name}[{i + 1}]={int(t[i + 1])} <= {name}[{i}]={int(t[i])}"
            )
    return t


def _as_int(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer number of nanoseconds, got {value!r}") from None


def _window_bounds(start_ns: int, stop_ns: int) -> tuple[int, int]:
    a = _as_int(start_ns, "start_ns")
    b = _as_int(stop_ns, "stop_ns")
    if a > b:
        raise ValueError(f"start_ns ({a}) is after stop_ns ({b})")
    return a, b


def integrate_window(
    t_ns: ArrayLike,
    power_w: ArrayLike,
    start_ns: int,
    stop_ns: int,
    *,
    period_ns: int | None = None,
    max_interval_ns: int | None = None,
    sensor_tau_ns: int = 0,
) -> WindowEnergy:
    """Estimate the energy (J) drawn over ``[start_ns, stop_ns]`` from power samples.

    Args:
        t_ns: sample stamps, strictly increasing integers, CLOCK_MONOTONIC ns.
        power_w: sample powers, W; sample ``k`` is the mean power over ``(t_ns[k-1], t_ns[k]]``.
        start_ns: window start, ns.
        stop_ns: window stop, ns (``>= start_ns``).
        period_ns: nominal sample spacing, ns. Defaults to the median stamp spacing; required with one sample.
        max_interval_ns: spacings longer than this (ns) are gaps. Defaults to ``2.5 * period_ns``.
        sensor_tau_ns: time constant of the sensor's first-order low-pass response, ns; 0 disables the
            sensor-response uncertainty term.

    Returns:
        A :class:`WindowEnergy`; see the module docstring for the model and the uncertainty terms.

    Raises:
        ValueError: malformed inputs, ``start_ns > stop_ns``, or no sample interval overlaps or brackets the
            window.
        TypeError: non-integer window bounds or periods.
    """
    t = _as_stamps(t_ns, "t_ns")
    p = np.asarray(power_w, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"power_w must be 1-D, got shape {p.shape}")
    if p.size != t.size:
        raise ValueError(f"t_ns and power_w differ in length ({t.size} != {p.size})")
    if not np.isfinite(p).all():
        i = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"power_w must be finite: power_w[{i}]={p[i]}")
    a, b = _window_bounds(start_ns, stop_ns)

    n = t.size
    if period_ns is not None:
        period = _as_int(period_ns, "period_ns")
        if period <= 0:
            raise ValueError(f"period_ns must be > 0, got {period}")
    elif n >= 2:
        # The median ignores the few long spacings a lost drain produces.
        period = max(1, round(float(np.median(np.diff(t)))))
    else:
        raise ValueError("a single power sample needs period_ns to know which interval it covers")
    if max_interval_ns is None:
        max_iv: float = 2.5 * period
    else:
        max_iv = _as_int(max_interval_ns, "max_interval_ns")
        if max_iv <= 0:
            raise ValueError(f"max_interval_ns must be > 0, got {max_iv}")
    tau = _as_int(sensor_tau_ns, "sensor_tau_ns")
    if tau < 0:
        raise ValueError(f"sensor_tau_ns must be >= 0, got {tau}")

    first_start = int(t[0]) - period
    last_stamp = int(t[-1])
    if a == b:
        if not first_start <= a <= last_stamp:
            raise ValueError(
                f"no power samples cover the window [{a}, {b}] ns: samples cover [{first_start}, {last_stamp}] ns"
            )
        return WindowEnergy(
            energy_j=0.0,
            duration_s=0.0,
            mean_power_w=math.nan,
            peak_power_w=math.nan,
            covered_s=0.0,
            coverage=1.0,
            gaps_ns=_readonly(np.empty((0, 2), dtype=np.int64)),
            n_samples=0,
            uncertainty_j=0.0,
            uncertainty_reasons=(),
        )
    if max(a, first_start) >= min(b, last_stamp):
        raise ValueError(
            f"no power samples cover the window [{a}, {b}] ns: samples cover [{first_start}, {last_stamp}] ns "
            f"(window is {'before' if b <= first_start else 'after'} them)"
        )

    # Only samples lo..hi can reach into the window; slicing keeps short windows on long traces O(log n).
    lo = int(np.searchsorted(t, a, side="right"))  # first stamp after start
    hi = min(int(np.searchsorted(t, b, side="left")), n - 1)  # first stamp at/after stop
    ts = t[lo : hi + 1]
    ps = p[lo : hi + 1]
    if lo > 0:
        prev_t = t[lo - 1 : hi]
        prev_p = p[lo - 1 : hi]
    else:
        prev_t = np.concatenate(([first_start], t[:hi]))
        prev_p = np.concatenate((p[:1], p[:hi]))

    is_gap = (ts - prev_t) > max_iv
    # max() keeps a gap sample from reaching back past its predecessor when max_interval_ns < period_ns.
    starts = np.where(is_gap, np.maximum(prev_t, ts - period), prev_t)
    ov = np.clip(np.minimum(ts, b) - np.maximum(starts, a), 0, None)
    gap_ov = np.clip(np.minimum(starts, b) - np.maximum(prev_t, a), 0, None)
    head_ov = max(0, min(first_start, b) - a)
    tail_ov = max(0, b - max(last_stamp, a))
    gap_fill = 0.5 * (prev_p + ps)
    first_p = float(p[0])
    last_p = float(p[-1])

    energy_wns = (
        float(np.dot(ps, ov.astype(np.float64)))
        + float(np.dot(gap_fill, gap_ov.astype(np.float64)))
        + first_p * head_ov
        + last_p * tail_ov
    )
    duration_ns = b - a
    covered_ns = int(ov.sum())

    gap_idx = np.flatnonzero(gap_ov > 0)
    gaps = np.empty((gap_idx.size + (head_ov > 0) + (tail_ov > 0), 2), dtype=np.int64)
    row = 0
    if head_ov > 0:
        gaps[0] = (a, min(first_start, b))
        row = 1
    gaps[row : row + gap_idx.size, 0] = np.maximum(prev_t[gap_idx], a)
    gaps[row : row + gap_idx.size, 1] = np.minimum(starts[gap_idx], b)
    if tail_ov > 0:
        gaps[-1] = (max(last_stamp, a), b)

    inside = np.flatnonzero(ov > 0)
    n_samples = int(inside.size)
    peak = float(ps[inside].max()) if n_samples else math.nan

    unc_wns, reasons = _uncertainty(
        p, ps, ts, starts, ov, prev_p, gap_ov, gap_idx, inside, lo, a, b, head_ov, tail_ov, duration_ns, period, tau
    )

    return WindowEnergy(
        energy_j=energy_wns / _NS_PER_S,
        duration_s=duration_ns / _NS_PER_S,
        mean_power_w=energy_wns / duration_ns,
        peak_power_w=peak,
        covered_s=covered_ns / _NS_PER_S,
        coverage=min(1.0, covered_ns / duration_ns),
        gaps_ns=_readonly(gaps),
        n_samples=n_samples,
        uncertainty_j=unc_wns / _NS_PER_S,
        uncertainty_reasons=reasons,
    )


def _uncertainty(
    p: np.ndarray,
    ps: np.ndarray,
    ts: np.ndarray,
    starts: np.ndarray,
    ov: np.ndarray,
    prev_p: np.ndarray,
    gap_ov: np.ndarray,
    gap_idx: np.ndarray,
    inside: np.ndarray,
    lo: int,
    a: int,
    b: int,
    head_ov: int,
    tail_ov: int,
    duration_ns: int,
    period: int,
    tau: int,
) -> tuple[float, tuple[str, ...]]:
    """Uncertainty terms of :func:`integrate_window` (see the module docstring).

    Arrays are the window's slice (``ps[j]`` is global sample ``lo + j``); ``p`` is the whole trace so that
    neighbours outside the slice are reachable. Returns the quadrature sum in W*ns and the reason strings.
    """
    parts: list[float] = []  # independent terms, W*ns, summed in quadrature
    labelled: list[tuple[float, str]] = []  # (size W*ns, text with a "{size}" slot) for the reasons
    short = duration_ns < 2 * period
    edge_f = edge_l = 0.0
    if inside.size:
        jf, jl = int(inside[0]), int(inside[-1])
        kf, kl = lo + jf, lo + jl
        spread_f = _spread(p, kf, kf - 1, kf + 1)
        spread_l = _spread(p, kl, kl + 1, kl - 1)
        if starts[jf] < a:
            o = int(ov[jf])
            edge_f = min(o, int(ts[jf] - starts[jf]) - o) * spread_f / 2
        if ts[jl] > b:
            o = int(ov[jl])
            edge_l = min(o, int(ts[jl] - starts[jl]) - o) * spread_l / 2
        if short:
            edge_f = max(edge_f, 0.5 * period * spread_f)
            edge_l = max(edge_l, 0.5 * period * spread_l)
        else:
            labelled.append((edge_f, f"start edge splits a sensor sample of {ps[jf]:.1f} W: {{size}}"))
            labelled.append((edge_l, f"stop edge splits a sensor sample of {ps[jl]:.1f} W: {{size}}"))
        parts += [edge_f, edge_l]
        if tau > 0:
            for side, k, other in (("start", kf, kf - 1), ("stop", kl, kl + 1)):
                if 0 <= other < p.size:
                    step = abs(float(p[k]) - float(p[other]))
                    labelled.append(
                        (
                            tau * step,
                            f"sensor response (tau {_fmt_ms(tau)}) to a {step:.1f} W step at the {side} edge: {{size}}",
                        )
                    )
                    parts.append(tau * step)
    if short:
        # Listed even when the edge terms are 0: the window is too short to trust sample alignment at all.
        labelled.append(
            (
                math.hypot(edge_f, edge_l),
                f"{_SHORT_WINDOW_REASON} ({_fmt_ms(duration_ns)} < {_fmt_ms(2 * period)}): edges {{size}}",
            )
        )
    gap_terms = gap_ov[gap_idx] * np.abs(prev_p[gap_idx] - ps[gap_idx]) / 2
    if gap_idx.size:
        gap_ns = float(gap_ov[gap_idx].sum())
        plural = "s" if gap_idx.size > 1 else ""
        labelled.append(
            (
                _quadrature(gap_terms),
                f"{gap_idx.size} sample gap{plural} ({_fmt_ms(gap_ns)}) filled with the neighbours' mean: {{size}}",
            )
        )
    if head_ov:
        size = head_ov * abs(float(p[0])) / 2
        labelled.append((size, f"{_fmt_ms(head_ov)} before the first sample filled with its power: {{size}}"))
        parts.append(size)
    if tail_ov:
        size = tail_ov * abs(float(p[-1])) / 2
        labelled.append((size, f"{_fmt_ms(tail_ov)} after the last sample filled with its power: {{size}}"))
        parts.append(size)

    total = _quadrature(np.concatenate((np.asarray(parts, dtype=np.float64), gap_terms)))
    if total == 0:
        return 0.0, ()
    kept = [(s, txt) for s, txt in labelled if s > 0 or txt.startswith(_SHORT_WINDOW_REASON)]
    kept.sort(key=lambda st: st[0], reverse=True)
    return total, tuple(txt.replace("{size}", f"{s / _NS_PER_S:.3g} J") for s, txt in kept)


def _quadrature(x: np.ndarray) -> float:
    """sqrt(sum(x**2)), scaled first so that tiny or huge terms neither underflow nor overflow."""
    if x.size == 0:
        return 0.0
    m = float(np.max(np.abs(x)))
    if m == 0:
        return 0.0
    return m * math.sqrt(float(np.sum(np.square(x / m))))


def _fmt_ms(ns: float) -> str:
    ms = ns / _NS_PER_MS
    return f"{ms:.1f} ms" if ms >= 0.1 else f"{ms:.3g} ms"


def _spread(p: np.ndarray, k: int, outside: int, fallback: int) -> float:
    """|power difference| (W) between sample ``k`` and its neighbour outside the window.

    At the ends of the trace there is no outside neighbour; the inside one is the only evidence of how much
    power varies around ``k``.
    """
    for j in (outside, fallback):
        if 0 <= j < p.size:
            return abs(float(p[k]) - float(p[j]))
    return 0.0


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def counter_delta_j(t_ns: ArrayLike, energy_mj: ArrayLike, start_ns: int, stop_ns: int) -> float | None:
    """Energy (J) over ``[start_ns, stop_ns]`` from a cumulative energy counter, for cross-checking.

    The counter (mJ, e.g. ``nvmlDeviceGetTotalEnergyConsumption``) is read at the stamped times ``t_ns``
    (CLOCK_MONOTONIC ns) and linearly interpolated at ``start_ns`` and ``stop_ns``. On H100 the counter
    accumulates the same sampled signal as the power stream, so agreement is a bookkeeping check, not an
    independent measurement.

    Returns:
        The energy in J, or None when the readings do not bracket the window (a reading at or before
        ``start_ns`` and one at or after ``stop_ns`` are needed).

    Raises:
        ValueError: malformed inputs, a decreasing counter (driver reload: split the trace), or
            ``start_ns > stop_ns``.
    """
    t = _as_stamps(t_ns, "t_ns")
    e = np.asarray(energy_mj)
    if e.ndim != 1:
        raise ValueError(f"energy_mj must be 1-D, got shape {e.shape}")
    if e.size != t.size:
        raise ValueError(f"t_ns and energy_mj differ in length ({t.size} != {e.size})")
    if e.dtype.kind == "u":
        # Signed arithmetic so that a decrease shows up as negative instead of wrapping around.
        e = e.astype(np.int64) if int(e.max()) <= np.iinfo(np.int64).max else e.astype(np.float64)
    elif e.dtype.kind == "f":
        if not np.isfinite(e).all():
            raise ValueError("energy_mj must be finite")
    elif e.dtype.kind != "i":
        raise ValueError(f"energy_mj must be numeric, got dtype {e.dtype}")
    if e.size > 1:
        bad = np.flatnonzero(e[1:] < e[:-1])
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"energy counter decreased at index {i + 1} ({e[i]} -> {e[i + 1]} mJ); split the trace there"
            )
    a, b = _window_bounds(start_ns, stop_ns)
    if a < t[0] or b > t[-1]:
        return None

    def locate(x: int) -> tuple[int, float]:
        i = int(np.searchsorted(t, x, side="right")) - 1
        if i == t.size - 1:
            return i, 0.0
        return i, (x - int(t[i])) / int(t[i + 1] - t[i])

    def step(i: int) -> float:
        return float(e[i + 1] - e[i]) if i + 1 < e.size else 0.0

    ia, fa = locate(a)
    ib, fb = locate(b)
    # Differences in the counter's own dtype stay exact for integer counters near 2**53 mJ.
    delta_mj = float(e[ib] - e[ia]) + fb * step(ib) - fa * step(ia)
    return delta_mj / 1000.0
