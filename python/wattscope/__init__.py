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
from .kernel_session import KernelTracingUnavailableError  # kernel tracing (kernel_session.py)
from .measurement import GpuEnergy, Measurement, to_frame
from .meter import LivePower, MeasurementWarning, PowerMeter
from .rapl import CpuEnergy, RaplMeter

__version__ = "0.1.0"


def list_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees, with its CUDA index when visible to CUDA."""
    from . import _session, devices

    return devices.all_gpus(_session.current().nvml())


def configure_sampler(**options: Any) -> None:
    """Restart the process-wide sampler with other cadences. Open meters must be closed first.

    Options (defaults in brackets): ``drain_period_ns`` buffered-sample drain [250 ms], ``instant_period_ns``
    [50 ms], ``average_period_ns`` [100 ms], ``energy_period_ns`` energy counter [5 s, plus a reading at every window
    edge], ``telemetry_period_ns`` SM clock and temperature [1 s], ``offset_period_ns`` realtime-offset
    re-measurement [1 s], ``linger_ns`` [3 s], ``overrun_factor`` [2.5 sample periods], ``capacity``,
    ``poll_energy``, ``poll_instant``."""
    from . import _session

    _session.reset(**options)


__all__ = [
    "CpuEnergy",
    "DeviceNotFoundError",
    "GpuEnergy",
    "GpuInfo",
    "GpuLostError",
    "KernelTracingUnavailableError",
    "LivePower",
    "Measurement",
    "MeasurementError",
    "MeasurementWarning",
    "NotSupportedError",
    "NvmlError",
    "NvmlNotFoundError",
    "NvmlPermissionError",
    "PowerMeter",
    "RaplMeter",
    "WattscopeError",
    "configure_sampler",
    "list_gpus",
    "to_frame",
]
