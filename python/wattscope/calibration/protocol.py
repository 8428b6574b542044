"""Measurement protocol: how long a measured window must be, and how to spread repetitions over the sensor's phase.

Window length
-------------
Take a window of length ``L`` over which the GPU draws a level ``P`` and steps by ``step_fraction * P`` at each
edge (1.0: from idle-negligible to ``P``; smaller when the work only adds to a busy baseline). A sensor with memory
``m`` (the time its response spreads a step over: ``tau`` for a first-order low-pass, half the width for a boxcar,
both the distance from the step to the impulse response's centre of mass once the pure delay is removed) moves
about ``m * step_fraction * P`` joules across each edge; where the reading stream cuts the window adds up to half a
sample period ``Ts / 2`` of misplaced time on top. So each edge errs by about ``e = (m + Ts / 2) * step_fraction *
P``, the two edges independently, giving a relative error of ``sqrt(2) * e / (L * P)``, the quadrature convention of
wattscope.energy. Solving for the target:

    L >= sqrt(2) * step_fraction * (m + Ts / 2) / target

and never below two sample periods, under which the window cannot be placed on the readings at all. The pure delay
is left out: it is a known shift of the reading stamps that a measurement applies, not an uncertainty. (H100 sample
stream, tau 11.5 ms, Ts 20 ms, full steps: 1 % needs 3.0 s, 2 % 1.52 s, 5 % 0.61 s.)

Phase offsets
-------------
Readings arrive on the sensor's own clock, so a window that always starts at the same phase of it always cuts the
same way; a short window repeated in lock-step with the sample clock, or a workload periodic near a multiple of the
sample period, is biased (fit.py, aliasing). Waiting a random, stratified offset in ``[0, Ts)`` before each
repetition spreads the cuts over the whole period (Yang et al., SC'24: evenly spaced phase shifts), and
stratification keeps even 4 repetitions from clustering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..response import Response

__all__ = ["Protocol", "min_window_s", "phase_offsets_s", "plan"]

_NS_PER_S = 1e9


@dataclass(frozen=True)
class Protocol:
    """How to measure with a given sensor.

    Attributes:
        window_s: minimum measured window length, s.
        repetitions: how many windows to measure.
        offsets_s: random phase offsets to wait before each repetition, s (one per repetition).
        reason: one line: why this window length (model, sample period, target).
    """

    window_s: float
    repetitions: int
    offsets_s: tuple[float, ...]
    reason: str


def _check_period(sample_period_ns: float) -> None:
    if not (math.isfinite(sample_period_ns) and sample_period_ns > 0):
        raise ValueError(f"sample_period_ns must be a positive finite number of ns, got {sample_period_ns!r}")


def min_window_s(
    response: Response, sample_period_ns: float, target_rel_uncertainty: float, *, step_fraction: float = 1.0
) -> float:
    """Shortest window, s, whose edge error stays below ``target_rel_uncertainty`` of its energy (see the module
    docstring): ``max(2 * Ts, sqrt(2) * step_fraction * (memory + Ts / 2) / target)``."""
    _check_period(sample_period_ns)
    if not 0.0 < target_rel_uncertainty < 1.0:
        raise ValueError(f"target_rel_uncertainty must be in (0, 1), got {target_rel_uncertainty!r}")
    if not 0.0 <= step_fraction <= 1.0:
        raise ValueError(f"step_fraction must be in [0, 1], got {step_fraction!r}")
    edge_ns = response.memory_ns() + sample_period_ns / 2
    window_ns = math.sqrt(2) * step_fraction * edge_ns / target_rel_uncertainty
    return max(2 * sample_period_ns, window_ns) / _NS_PER_S


def phase_offsets_s(n: int, period_s: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` offsets in ``[0, period_s)``, s: one uniformly placed in each of ``n`` equal strata, shuffled."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if not (math.isfinite(period_s) and period_s > 0):
        raise ValueError(f"period_s must be a positive finite number of seconds, got {period_s!r}")
    offsets = (np.arange(n) + rng.random(n)) / n * period_s
    # Rounding can carry the last stratum's top onto the period itself; keep the interval half-open.
    offsets = np.minimum(offsets, np.nextafter(period_s, 0.0))
    return rng.permutation(offsets)


def plan(
    response: Response,
    sample_period_ns: float,
    *,
    target_rel_uncertainty: float = 0.02,
    repetitions: int = 4,
    rng: np.random.Generator | None = None,
) -> Protocol:
    """A protocol for this sensor: the minimum window for the target, and stratified phase offsets over one sample
    period for each repetition."""
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions!r}")
    window_s = min_window_s(response, sample_period_ns, target_rel_uncertainty)
    offsets = phase_offsets_s(repetitions, sample_period_ns / _NS_PER_S, rng or np.random.default_rng())
    memory_ms = response.memory_ns() / 1e6
    period_ms = sample_period_ns / 1e6
    at_floor = window_s * _NS_PER_S <= 2 * sample_period_ns * (1 + 1e-12)
    floor = " (floor: 2 sample periods)" if at_floor else ""
    reason = (
        f"{response.describe()}, a reading every {period_ms:.3g} ms: each window edge misplaces ~{memory_ms:.3g} ms "
        f"of sensor memory + {period_ms / 2:.3g} ms of sampling, so {target_rel_uncertainty:.1%} needs "
        f">= {window_s:.3g} s{floor}"
    )
    return Protocol(
        window_s=window_s, repetitions=repetitions, offsets_s=tuple(float(o) for o in offsets), reason=reason
    )
