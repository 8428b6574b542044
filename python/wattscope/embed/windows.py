"""Energy of a part of a measured window, from the readings the Measurement already holds.

The meter's integral is additive over adjacent windows (energy.py), so integrating its own aligned readings over
sub-windows gives parts that add up to the whole exactly: `wattscope run --interval-s`, a benchmark's rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import _session, energy
from ..measurement import Measurement, gpu_key
from ..sensor import sensor_model


@dataclass(frozen=True)
class SubWindow:
    """Energy of every measured GPU over ``[start_ns, stop_ns]`` (inside the measurement's window)."""

    start_ns: int
    stop_ns: int
    energy_j: float
    uncertainty_j: float
    gpu_energy_j: dict[str, float]  # "gpu0" -> J, the keys of Measurement.to_dict()

    @property
    def duration_s(self) -> float:
        return (self.stop_ns - self.start_ns) / 1e9

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start_ns": self.start_ns, "stop_ns": self.stop_ns, "duration_s": self.duration_s,
            "energy_j": self.energy_j, "uncertainty_j": self.uncertainty_j,
            "mean_power_w": self.energy_j / self.duration_s if self.duration_s > 0 else math.nan,
        }
        out.update({f"{key}.energy_j": e for key, e in self.gpu_energy_j.items()})
        return out


def sub_window(m: Measurement, start_ns: int, stop_ns: int) -> SubWindow:
    """Integrate each GPU's readings in ``m`` over ``[start_ns, stop_ns]`` exactly as the meter did over the whole
    window (same stamp shift, sample period and sensor response). A GPU measured by its energy counter alone has no
    readings to split: nan."""
    if not m.start_ns <= start_ns <= stop_ns <= m.stop_ns:
        raise ValueError(f"[{start_ns}, {stop_ns}] is not inside the measurement's window [{m.start_ns}, {m.stop_ns}]")
    driver = _session.current().driver_version()
    total_j, var_j2, per_gpu = 0.0, 0.0, {}
    for g in m.gpus:
        key = gpu_key(g)
        if g.source == "energy_counter" or len(g.t_ns) == 0:
            e, u = math.nan, math.nan
        else:
            we = energy.integrate_window(
                g.t_ns - g.sensor_shift_ns, g.power_w, start_ns, stop_ns,
                period_ns=round(g.sample_period_s * 1e9) if g.sample_period_s else None,
                sensor_tau_ns=sensor_model(g.name, driver, g.source).memory_ns,
            )
            e, u = we.energy_j, we.uncertainty_j
        per_gpu[key] = e
        total_j += e
        var_j2 += u * u
    return SubWindow(start_ns, stop_ns, total_j, math.sqrt(var_j2), per_gpu)


def intervals(m: Measurement, interval_s: float) -> list[SubWindow]:
    """``m``'s window cut into consecutive ``interval_s`` pieces (the last one shorter); they add up to ``m``."""
    if not (interval_s > 0 and math.isfinite(interval_s)):
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
    step_ns = max(1, round(interval_s * 1e9))
    edges = list(range(m.start_ns, m.stop_ns, step_ns)) + [m.stop_ns]
    return [sub_window(m, a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
