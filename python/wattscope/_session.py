"""The process-wide sampling session: one NVML handle and one native sampler thread shared by every meter.

Meters are windows over the shared sample timeline, which makes nested and concurrent meters free and keeps enter/exit
cheap (a clock read and a counter). The thread is started by the first meter, lingers a few seconds after the last
one (so results can collect the samples that cover a window's end) and then stops by itself.

Fork: a child starts with a fresh, empty session (the parent's thread does not exist there). Exit: an atexit hook
stops the thread, so a meter left running never outlives the interpreter, and the kernel tracing (detaching CUPTI
when a torch.profiler session left Kineto attached: kernel_session.detach_at_exit).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path
from typing import Any

from .errors import NVML_PATH_ENV, WattscopeError

_lock = threading.Lock()


def core() -> Any:
    """The compiled module, or a clear error when the package was installed without it."""
    try:
        from . import _core
    except ImportError as e:  # pragma: no cover - depends on how the package was installed
        raise WattscopeError(
            f"wattscope's native module failed to load ({e}). Reinstall with `pip install .` from a source tree "
            "with a C++17 compiler, or from a wheel for this platform."
        ) from e
    return _core


def native_file(relative: str) -> Path:
    """A file installed with the compiled module (the fake NVML, the calibration fatbin). An editable install keeps
    these beside _core, apart from the Python sources, so they are found relative to _core, not to this file."""
    return Path(core().__file__).parent / relative


class Session:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self._nvml: Any = None
        self._sampler: Any = None
        self._slots: dict[int, int] = {}
        self._options: dict[str, Any] = {}
        self._driver_version: str | None = None
        self._kernel_tracing: Any = None  # kernel_session.KernelTracing, made by the first meter with kernels

    # -- kernel tracing (kernel_session.py) --
    def kernel_tracing(self) -> Any:
        from .kernel_session import KernelTracing

        with _lock:
            if self._kernel_tracing is None:
                self._kernel_tracing = KernelTracing(core(), self.sampler)
            return self._kernel_tracing
    # -- end kernel tracing --

    def nvml(self) -> Any:
        with _lock:
            if self._nvml is None:
                self._nvml = core().Nvml(os.environ.get(NVML_PATH_ENV, ""))
            return self._nvml

    def driver_version(self) -> str:
        """The NVIDIA driver's version string ("" when NVML cannot tell)."""
        if self._driver_version is None:
            try:
                self._driver_version = str(self.nvml().driver_version())
            except WattscopeError:
                self._driver_version = ""
        return self._driver_version

    def configure(self, **options: Any) -> None:
        nvml = self.nvml()
        with _lock:
            if self._sampler is not None:
                self._sampler.stop()
            self._options = dict(options)
            self._sampler = core().Sampler(nvml, **self._options)
            self._slots = {}

    def sampler(self) -> Any:
        nvml = self.nvml()
        with _lock:
            if self._sampler is None:
                self._sampler = core().Sampler(nvml, **self._options)
            return self._sampler

    def slot(self, nvml_index: int) -> int:
        sampler = self.sampler()
        with _lock:
            slot = self._slots.get(nvml_index)
            if slot is None:
                slot = sampler.add_device(nvml_index)
                self._slots[nvml_index] = slot
            return slot

    def shutdown(self) -> None:
        with _lock:
            sampler = self._sampler
            tracing = self._kernel_tracing
        if tracing is not None and os.getpid() == self.pid:
            tracing.shutdown()
        if sampler is not None and os.getpid() == self.pid:
            sampler.stop()


_current = Session()


def current() -> Session:
    return _current


def reset(**sampler_options: Any) -> None:
    """Stop the thread and start over with a new NVML handle and sampler (tests; a changed WATTSCOPE_NVML_PATH)."""
    global _current
    _current.shutdown()
    _current = Session()
    if sampler_options:
        _current.configure(**sampler_options)


def _after_fork_in_child() -> None:
    global _current, _lock
    # The parent's objects stay referenced here on purpose: dropping them is safe (the native side leaks its state
    # in a child) but keeping them avoids any work at all in a DataLoader worker that never measures.
    _lock = threading.Lock()
    _orphans.append(_current)
    _current = Session()


_orphans: list[Session] = []
os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    _current.shutdown()
    kernel_session = sys.modules.get(__package__ + ".kernel_session")  # not imported: no CUPTI was loaded
    if kernel_session is not None:
        kernel_session.detach_at_exit()


atexit.register(_at_exit)
