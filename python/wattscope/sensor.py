"""What wattscope assumes about a GPU's power sensor when no calibration profile exists.

Figures come from ../docs (measurement-facts §2): on H100 SXM with driver 580 the buffered sample stream behaves like
a first-order low-pass filter with tau ≈ 11.5 ms sampled every ~20 ms. For other GPUs the response is not known yet;
the estimate then carries no sensor-response term and says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SensorModel:
    """A sensor response used by the uncertainty estimate."""

    tau_ns: int  # first-order low-pass time constant; 0 when unknown
    origin: str  # where the figure came from, recorded in every Measurement


_FAMILY_DEFAULTS: tuple[tuple[str, SensorModel], ...] = (
    ("H100", SensorModel(tau_ns=11_500_000, origin="built-in default for H100 (tau 11.5 ms, measured on H100 SXM)")),
    ("H200", SensorModel(tau_ns=11_500_000, origin="built-in default for Hopper (tau 11.5 ms, measured on H100 SXM)")),
)


def default_sensor_model(gpu_name: str) -> SensorModel:
    """The built-in sensor model for a GPU, by its marketing name."""
    for family, model in _FAMILY_DEFAULTS:
        if family in gpu_name:
            return model
    return SensorModel(tau_ns=0, origin=f"no sensor model for {gpu_name!r}: response not characterised")
