"""Testing without a GPU: drive the fake NVML library that ships with wattscope.

The fake is loaded by wattscope through the same dlopen path as the real NVML (``WATTSCOPE_NVML_PATH``), so the
real native sampler thread, loader and bindings run; this module opens the same file with ctypes (which returns
the already-loaded instance) to program its power trace and failures.

    fake = FakeNvml.install(n_devices=2)      # sets WATTSCOPE_NVML_PATH and restarts wattscope's session
    fake.set_trace(0, t_s=[0, 0.5], power_w=[100, 300])
    with PowerMeter("all") as m: ...
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import NVML_PATH_ENV

SOURCE_SAMPLES = 0
SOURCE_INSTANT = 1
SOURCE_AVERAGE = 2
SOURCE_ENERGY = 3
SOURCE_CLOCKS_TEMP = 4

GPU_IS_LOST = 15
NOT_SUPPORTED = 3


def fake_nvml_path() -> Path:
    """Path of the fake NVML library built with the package."""
    from ._session import native_file

    path = native_file("libwattscope_fake_nvml.so")
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the package was built without the fake NVML (CMake option WATTSCOPE_FAKE_NVML=ON)"
        )
    return path


class FakeNvml:
    """ctypes handle on the fake NVML's control API (see csrc/testing/fake_nvml_control.h)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or fake_nvml_path()
        self._lib = ctypes.CDLL(str(self.path))
        lib = self._lib
        lib.fake_nvml_reset.argtypes = [ctypes.c_uint]
        lib.fake_nvml_set_trace.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_double),
                                            ctypes.POINTER(ctypes.c_double), ctypes.c_uint, ctypes.c_double,
                                            ctypes.c_longlong]
        lib.fake_nvml_set_sample_period_us.argtypes = [ctypes.c_uint, ctypes.c_uint]
        lib.fake_nvml_set_ring_size.argtypes = [ctypes.c_uint, ctypes.c_uint]
        lib.fake_nvml_set_supported.argtypes = [ctypes.c_uint, ctypes.c_int, ctypes.c_int]
        lib.fake_nvml_fail.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_int]
        lib.fake_nvml_fail_init.argtypes = [ctypes.c_int]
        lib.fake_nvml_set_delay_us.argtypes = [ctypes.c_char_p, ctypes.c_uint]
        lib.fake_nvml_call_count.argtypes = [ctypes.c_char_p]
        lib.fake_nvml_call_count.restype = ctypes.c_ulonglong
        lib.fake_nvml_origin_mono_ns.argtypes = [ctypes.c_uint]
        lib.fake_nvml_origin_mono_ns.restype = ctypes.c_longlong
        lib.fake_nvml_energy_j.argtypes = [ctypes.c_uint, ctypes.c_longlong, ctypes.c_longlong]
        lib.fake_nvml_energy_j.restype = ctypes.c_double
        lib.fake_nvml_init_refcount.restype = ctypes.c_int
        lib.fake_nvml_set_realtime_shift_us.argtypes = [ctypes.c_longlong]

    @classmethod
    def install(cls, n_devices: int = 1, **sampler_options: object) -> FakeNvml:
        """Point wattscope at the fake, reset it to ``n_devices`` and start a fresh wattscope session."""
        from . import _session

        fake = cls()
        os.environ[NVML_PATH_ENV] = str(fake.path)
        fake.reset(n_devices)
        _session.reset(**sampler_options)
        return fake

    def reset(self, n_devices: int = 1) -> None:
        self._lib.fake_nvml_reset(n_devices)

    def set_trace(self, dev: int, t_s: Sequence[float], power_w: Sequence[float], *, repeat_period_s: float = 0.0,
                  origin_mono_ns: int = 0) -> None:
        n = len(t_s)
        if n == 0 or n != len(power_w):
            raise ValueError("t_s and power_w must be non-empty and of equal length")
        t = (ctypes.c_double * n)(*t_s)
        p = (ctypes.c_double * n)(*power_w)
        self._lib.fake_nvml_set_trace(dev, t, p, n, repeat_period_s, origin_mono_ns)

    def set_sample_period_us(self, dev: int, period_us: int) -> None:
        self._lib.fake_nvml_set_sample_period_us(dev, period_us)

    def set_ring_size(self, dev: int, n: int) -> None:
        self._lib.fake_nvml_set_ring_size(dev, n)

    def set_supported(self, dev: int, source: int, supported: bool) -> None:
        self._lib.fake_nvml_set_supported(dev, source, int(supported))

    def fail(self, function: str, dev: int, after_calls: int, code: int) -> None:
        self._lib.fake_nvml_fail(function.encode(), dev, after_calls, code)

    def fail_init(self, code: int) -> None:
        self._lib.fake_nvml_fail_init(code)

    def set_delay_us(self, function: str, delay_us: int) -> None:
        self._lib.fake_nvml_set_delay_us(function.encode(), delay_us)

    def call_count(self, function: str) -> int:
        return int(self._lib.fake_nvml_call_count(function.encode()))

    def origin_mono_ns(self, dev: int) -> int:
        return int(self._lib.fake_nvml_origin_mono_ns(dev))

    def energy_j(self, dev: int, from_mono_ns: int, to_mono_ns: int) -> float:
        """The exact integral of the device's true power over the interval."""
        return float(self._lib.fake_nvml_energy_j(dev, from_mono_ns, to_mono_ns))

    def init_refcount(self) -> int:
        return int(self._lib.fake_nvml_init_refcount())

    def set_realtime_shift_us(self, shift_us: int) -> None:
        """Step the realtime clock that stamps the fake's samples (negative: back), as the sampler sees it too.

        Not cumulative; 0 after ``reset``. Every stamp handed out afterwards is shifted, those of the samples
        already in the ring included.
        """
        self._lib.fake_nvml_set_realtime_shift_us(shift_us)
