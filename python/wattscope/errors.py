"""The exception tree, and the one place where native NVML failures become Python exceptions.

Every error says what to do next. ``nvml_error`` is called by the compiled module's exception translator (and by the
result code for failures captured on the sampler thread), so the mapping from NVML return codes lives only here.
"""

from __future__ import annotations

NVML_PATH_ENV = "WATTSCOPE_NVML_PATH"


class WattscopeError(Exception):
    """Root of every wattscope error."""


class NvmlError(WattscopeError):
    """An NVML call failed. ``code`` is NVML's return code, ``call`` the function."""

    def __init__(self, message: str, *, call: str = "", code: int = -1) -> None:
        super().__init__(message)
        self.call = call
        self.code = code


class NvmlNotFoundError(NvmlError):
    """The NVML library (or the driver behind it) is not available on this machine."""


class NvmlPermissionError(NvmlError):
    """NVML refused the call for lack of permission."""


class NotSupportedError(NvmlError):
    """The GPU does not offer what was asked (for instance no power reading at all)."""


class GpuLostError(NvmlError):
    """The GPU fell off the bus, needs a reset, or the driver went away mid-measurement."""


class DeviceNotFoundError(WattscopeError, ValueError):
    """A device selector (index, UUID, bus id) names no GPU of this machine."""


class MeasurementError(WattscopeError):
    """A measurement was used wrongly (not started, started twice, no samples cover the window...)."""


_ADVICE_NOT_FOUND = (
    "Is the NVIDIA driver installed? wattscope loads libnvidia-ml.so.1 at run time; set "
    f"{NVML_PATH_ENV}=/path/to/libnvidia-ml.so.1 if it lives elsewhere, and run `wattscope doctor` to check."
)

_BY_CODE: dict[int, tuple[type[NvmlError], str]] = {
    3: (NotSupportedError, "This GPU or driver does not offer it (older GPUs, vGPU and MIG often don't)."),
    4: (NvmlPermissionError, "Run as a user allowed to query the GPU (power reads normally need no root)."),
    9: (NvmlNotFoundError, "The NVIDIA kernel driver is not loaded. " + _ADVICE_NOT_FOUND),
    12: (NvmlNotFoundError, _ADVICE_NOT_FOUND),
    13: (NvmlNotFoundError, "The NVML library lacks a function wattscope needs: update the NVIDIA driver."),
    15: (GpuLostError, "The GPU is lost: check `nvidia-smi` and the kernel log; the GPU likely needs a reset."),
    16: (GpuLostError, "The GPU needs a reset before it can be used again."),
    18: (NvmlNotFoundError, "The NVML library and the kernel driver versions differ: reboot or reinstall the driver."),
}


def nvml_error(call: str, code: int, message: str) -> NvmlError:
    """Build the typed exception for an NVML failure (``code`` is NVML's return code)."""
    cls, advice = _BY_CODE.get(code, (NvmlError, "Run `wattscope doctor` to see what works on this machine."))
    return cls(f"{call}: {message} (NVML code {code}). {advice}", call=call, code=code)
