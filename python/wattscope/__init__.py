"""wattscope: precise energy of GPU work, from NVML's buffered power samples drained by a native thread.

    from wattscope import PowerMeter
    with PowerMeter() as m:
        run_inference()
    print(m.result)            # energy_j, mean/peak power, uncertainty, coverage, per-GPU readings
"""

from __future__ import annotations

from typing import Any

from .devices import GpuInfo
from .errors import (
    DeviceNotFoundError,
    GpuLostError,
    MeasurementError,
    NotSupportedError,
    NvmlError,
    NvmlNotFoundError,
    NvmlPermissionError,
    WattscopeError,
)
from .measurement import GpuEnergy, Measurement
from .meter import MeasurementWarning, PowerMeter

__version__ = "0.1.0"


def list_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees, with its CUDA index when visible to CUDA."""
    from . import _session, devices

    return devices.all_gpus(_session.current().nvml())


def configure_sampler(**options: Any) -> None:
    """Restart the process-wide sampler with other cadences (``drain_period_ns``, ``instant_period_ns``,
    ``energy_period_ns``, ``linger_ns``, ``capacity``, ``poll_energy``, ...). Open meters must be closed first."""
    from . import _session

    _session.reset(**options)


__all__ = [
    "DeviceNotFoundError",
    "GpuEnergy",
    "GpuInfo",
    "GpuLostError",
    "Measurement",
    "MeasurementError",
    "MeasurementWarning",
    "NotSupportedError",
    "NvmlError",
    "NvmlNotFoundError",
    "NvmlPermissionError",
    "PowerMeter",
    "WattscopeError",
    "configure_sampler",
    "list_gpus",
]
