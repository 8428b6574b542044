"""The calibration load: a power schedule (steps, square waves) drawn by a GPU-timed kernel.

``GpuLoad`` runs square_wave.cu on one GPU. The host gives the schedule on its own clock (CLOCK_MONOTONIC ns, the
clock every wattscope reading is stamped on); the kernel follows it on the GPU's %globaltimer, so its edges do not
depend on host or launch jitter. The two clocks are tied by bracketing: read the monotonic clock, have a kernel
write %globaltimer, synchronise, read the monotonic clock again; over ~20 tries the tightest bracket gives the
offset, and its width is the alignment uncertainty.

The kernels come from the fatbin the build compiled when it had a CUDA compiler, else from NVRTC at run time
(cuda-python's ``cuda.bindings``), so any install with cuda-bindings can calibrate. The load runs in the device's
primary context, the one torch uses, so both live in one process; wattscope itself never needs torch.

``FakeLoad`` has the same interface for machines without a GPU: it programs the fake NVML's power trace to follow
the schedule (``wattscope calibrate --fake`` and the tests).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DeviceNotFoundError, WattscopeError

_KERNEL_SOURCE = "square_wave.cu"
_FATBIN = "square_wave.fatbin"
_THREADS_PER_BLOCK = 256
# 1024 resident threads per SM with 8 independent FMA chains each keep every FMA pipe busy; more adds no power.
_MAX_BLOCKS_PER_SM = 4
_ALIGN_REPEATS = 20
# The host sleeps through a schedule and only synchronises for its last moments, so that waiting does not spin a
# CPU core for seconds.
_SYNC_LEAD_NS = 5_000_000
# Grace added to the kernel's own life limit beyond the schedule's end.
_LIMIT_GRACE_NS = 1_000_000_000
# CUresult codes after which the shipped fatbin is skipped for NVRTC: no code for this GPU, PTX newer than the
# driver, or PTX it cannot JIT.
_FATBIN_UNUSABLE = {209, 218, 222}


class LoadError(WattscopeError):
    """The calibration load could not run: a CUDA or NVRTC call failed, or cuda-python is missing.

    ``call`` is the failing function, ``code`` its return code (-1 when there is none)."""

    def __init__(self, message: str, *, call: str = "", code: int = -1) -> None:
        super().__init__(message)
        self.call = call
        self.code = code


@dataclass(frozen=True)
class ClockAlignment:
    """%globaltimer minus CLOCK_MONOTONIC, from the tightest of several brackets."""

    offset_ns: int
    uncertainty_ns: int  # width of the tightest bracket: the GPU read its clock somewhere inside it
    measured_mono_ns: int


@dataclass(frozen=True)
class LoadRun:
    """What one schedule did, on CLOCK_MONOTONIC."""

    busy_ns: np.ndarray  # (n, 2) int64: the busy intervals as scheduled
    start_ns: int  # when the whole load was running (the last block's start)
    end_ns: int  # when the last block exited
    alignment_uncertainty_ns: int  # how far the real edges may sit from busy_ns
    clock_drift_ns: int  # change of the globaltimer offset from before to after the run


class Load(Protocol):
    """What the calibration runner needs from a load (GpuLoad, FakeLoad)."""

    @property
    def uuid(self) -> str | None:
        """The NVML-style UUID ("GPU-...") of the loaded GPU, None when unknown."""

    @property
    def description(self) -> str:
        """One line for reports: which GPU, which kernels."""

    def run(self, busy_ns: np.ndarray, end_ns: int) -> LoadRun: ...

    def close(self) -> None: ...


def validate_schedule(busy_ns: Any, end_ns: int, now_ns: int) -> np.ndarray:
    """Check a schedule and return it as an (n, 2) int64 array. Raises ValueError when it is malformed."""
    busy = np.asarray(busy_ns, dtype=np.int64).reshape(-1, 2)
    if len(busy) == 0:
        raise ValueError("a schedule needs at least one busy interval")
    if np.any(busy[:, 1] <= busy[:, 0]):
        raise ValueError("every busy interval must end after it starts")
    if np.any(busy[1:, 0] < busy[:-1, 1]):
        raise ValueError("busy intervals must be sorted and must not overlap")
    if int(end_ns) < int(busy[-1, 1]):
        raise ValueError(f"end_ns ({end_ns}) is before the last busy interval ends ({int(busy[-1, 1])})")
    if int(busy[0, 0]) <= now_ns:
        late_ms = (now_ns - int(busy[0, 0])) / 1e6
        raise ValueError(f"the schedule starts {late_ms:.1f} ms in the past: give future times")
    return busy


class GpuLoad:
    """The square-wave kernel on CUDA device ``cuda_index`` (CUDA's numbering, as torch's).

    ``run(busy_ns, end_ns)`` blocks until the schedule is done. Use as a context manager, or call ``close()``.
    """

    def __init__(self, cuda_index: int = 0) -> None:
        if not isinstance(cuda_index, int) or cuda_index < 0:
            raise ValueError(f"cuda_index must be a non-negative int, got {cuda_index!r}")
        self.cuda_index = cuda_index
        self._driver, self._nvrtc = _import_cuda()
        self._ctx: Any = None
        self._module: Any = None
        self._stream: Any = None
        self._buffers: list[Any] = []
        self._timer_buf: Any = None
        self._span_buf: Any = None
        self._sink_buf: Any = None
        cu = self._call
        cu("cuInit", self._driver.cuInit(0))
        count = cu("cuDeviceGetCount", self._driver.cuDeviceGetCount())
        if cuda_index >= count:
            raise DeviceNotFoundError(f"CUDA device {cuda_index} does not exist: CUDA sees {count} device(s) "
                                      "(CUDA_VISIBLE_DEVICES applies); pick one with --device")
        self._device = cu("cuDeviceGet", self._driver.cuDeviceGet(cuda_index))
        attr = self._driver.CUdevice_attribute
        self.compute_capability = (
            cu("cuDeviceGetAttribute", self._driver.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._device)),
            cu("cuDeviceGetAttribute", self._driver.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._device)),
        )
        if self.compute_capability < (7, 0):
            raise LoadError(f"the calibration load needs compute capability 7.0 or newer (__nanosleep); this GPU has "
                            f"{self.compute_capability[0]}.{self.compute_capability[1]}")
        self.sm_count = cu("cuDeviceGetAttribute", self._driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self._device))
        name = cu("cuDeviceGetName", self._driver.cuDeviceGetName(256, self._device))
        self.name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        raw = bytes(cu("cuDeviceGetUuid", self._driver.cuDeviceGetUuid(self._device)).bytes)
        h = raw.hex()
        self.uuid: str | None = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        self._ctx = cu("cuDevicePrimaryCtxRetain", self._driver.cuDevicePrimaryCtxRetain(self._device))
        try:
            with self._current():
                self._setup()
        except BaseException:
            self.close()
            raise

    # -- public ------------------------------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        major, minor = self.compute_capability
        return (f"CUDA device {self.cuda_index} ({self.name}, sm_{major}{minor}, {self.sm_count} SMs × "
                f"{self._blocks_per_sm} blocks of {_THREADS_PER_BLOCK} threads; kernels from {self.kernel_origin})")

    def align(self, repeats: int = _ALIGN_REPEATS) -> ClockAlignment:
        """Measure %globaltimer - CLOCK_MONOTONIC (see the module docstring)."""
        cu, drv = self._call, self._driver
        out = np.zeros(1, dtype=np.uint64)
        best: tuple[int, int, int] | None = None
        with self._current():
            for _ in range(repeats):
                before_ns = time.monotonic_ns()
                self._launch(self._read_timer, 1, 1, [(np.uint64, int(self._timer_buf))])
                cu("cuStreamSynchronize", drv.cuStreamSynchronize(self._stream))
                after_ns = time.monotonic_ns()
                cu("cuMemcpyDtoHAsync", drv.cuMemcpyDtoHAsync(out.ctypes.data, self._timer_buf, 8, self._stream))
                cu("cuStreamSynchronize", drv.cuStreamSynchronize(self._stream))
                if best is None or after_ns - before_ns < best[1] - best[0]:
                    best = (before_ns, after_ns, int(out[0]))
        assert best is not None
        before_ns, after_ns, gpu_ns = best
        mid_ns = before_ns + (after_ns - before_ns) // 2
        return ClockAlignment(gpu_ns - mid_ns, after_ns - before_ns, mid_ns)

    def run(self, busy_ns: np.ndarray, end_ns: int) -> LoadRun:
        """Be busy inside each ``busy_ns`` interval (CLOCK_MONOTONIC ns, (n, 2), sorted), quiet elsewhere, until
        ``end_ns``. Blocks until done. Raises LoadError when the kernel started after the first busy edge (the GPU
        was busy with other work) or a CUDA call fails."""
        busy = validate_schedule(busy_ns, end_ns, time.monotonic_ns())
        cu, drv = self._call, self._driver
        before = self.align()
        edges = (busy.reshape(-1) + before.offset_ns).astype(np.uint64)
        span = np.zeros(2, dtype=np.uint64)
        limit_ns = int(end_ns) - time.monotonic_ns() + _LIMIT_GRACE_NS
        with self._current():
            d_edges = cu("cuMemAlloc", drv.cuMemAlloc(edges.nbytes))
            try:
                cu("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(d_edges, edges.ctypes.data, edges.nbytes, self._stream))
                cu("cuMemsetD8Async", drv.cuMemsetD8Async(self._span_buf, 0, 16, self._stream))
                self._launch(self._schedule, self.sm_count * self._blocks_per_sm, _THREADS_PER_BLOCK, [
                    (np.uint64, int(d_edges)), (np.int32, len(edges)), (np.uint64, int(end_ns) + before.offset_ns),
                    (np.uint64, limit_ns), (np.uint64, int(self._span_buf)), (np.uint64, int(self._sink_buf)),
                ])
                wait_ns = int(end_ns) - _SYNC_LEAD_NS - time.monotonic_ns()
                if wait_ns > 0:
                    time.sleep(wait_ns / 1e9)
                cu("cuStreamSynchronize", drv.cuStreamSynchronize(self._stream))
                cu("cuMemcpyDtoHAsync", drv.cuMemcpyDtoHAsync(span.ctypes.data, self._span_buf, 16, self._stream))
                cu("cuStreamSynchronize", drv.cuStreamSynchronize(self._stream))
            finally:
                # Also on an interrupt: the kernel reads the edges until it exits, so wait for it before freeing.
                drv.cuStreamSynchronize(self._stream)
                cu("cuMemFree", drv.cuMemFree(d_edges))
        after = self.align()
        start_ns = int(span[0]) - before.offset_ns
        if start_ns > int(busy[0, 0]):
            raise LoadError(
                f"the calibration load started {(start_ns - int(busy[0, 0])) / 1e6:.1f} ms after its first busy edge: "
                f"the GPU was busy with other work. Run wattscope calibrate on an idle GPU."
            )
        return LoadRun(busy, start_ns, int(span[1]) - before.offset_ns,
                       max(before.uncertainty_ns, after.uncertainty_ns), after.offset_ns - before.offset_ns)

    def close(self) -> None:
        """Free what the load holds and release the primary context (idempotent)."""
        if self._ctx is None:
            return
        drv = self._driver
        try:
            with self._current():
                if self._stream is not None:
                    drv.cuStreamSynchronize(self._stream)
                    drv.cuStreamDestroy(self._stream)
                for buf in self._buffers:
                    drv.cuMemFree(buf)
                if self._module is not None:
                    drv.cuModuleUnload(self._module)
        finally:
            self._stream, self._buffers, self._module = None, [], None
            drv.cuDevicePrimaryCtxRelease(self._device)
            self._ctx = None

    def __enter__(self) -> GpuLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cu, drv = self._call, self._driver
        self._module, self.kernel_origin = self._load_module()
        self._read_timer = cu("cuModuleGetFunction", drv.cuModuleGetFunction(self._module, b"ws_read_globaltimer"))
        self._schedule = cu("cuModuleGetFunction", drv.cuModuleGetFunction(self._module, b"ws_schedule"))
        per_sm = cu("cuOccupancyMaxActiveBlocksPerMultiprocessor",
                    drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(self._schedule, _THREADS_PER_BLOCK, 0))
        # All blocks must be resident at once: a block waiting for a slot would miss its edges.
        self._blocks_per_sm = max(1, min(int(per_sm), _MAX_BLOCKS_PER_SM))
        # Non-blocking: the load neither waits for nor holds up work on the legacy default stream (torch's).
        self._stream = cu("cuStreamCreate", drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING.value))
        self._timer_buf = self._alloc(8)
        self._span_buf = self._alloc(16)
        self._sink_buf = self._alloc(4)
        self.align(2)  # the first launch of a module pays for its loading: keep that out of every measurement

    def _alloc(self, nbytes: int) -> Any:
        buf = self._call("cuMemAlloc", self._driver.cuMemAlloc(nbytes))
        self._buffers.append(buf)
        return buf

    def _load_module(self) -> tuple[Any, str]:
        drv = self._driver
        fatbin = _find_fatbin()
        if fatbin is not None:
            image = fatbin.read_bytes()
            err, module = drv.cuModuleLoadData(image)
            if int(err) == 0:
                return module, f"the build's fatbin ({fatbin.name})"
            if int(err) not in _FATBIN_UNUSABLE:
                self._call("cuModuleLoadData", (err, module))
        image, arch = self._compile()
        module = self._call("cuModuleLoadData", drv.cuModuleLoadData(image))
        return module, f"NVRTC ({arch})"

    def _compile(self) -> tuple[bytes, str]:
        nv = self._nvrtc
        source = Path(__file__).with_name(_KERNEL_SOURCE).read_bytes()
        supported = self._rtc("nvrtcGetSupportedArchs", nv.nvrtcGetSupportedArchs())
        major, minor = self.compute_capability
        cc = 10 * major + minor
        older = [a for a in supported if a <= cc]
        if not older:
            raise LoadError(f"this NVRTC compiles for sm_{min(supported)} and newer, the GPU is sm_{cc}: install a "
                            "cuda-bindings / NVRTC release that supports it")
        # A cubin for the exact architecture when NVRTC knows it; else PTX for the newest older one, which the
        # driver compiles on load (a GPU newer than this NVRTC).
        exact = cc in supported
        arch = f"sm_{cc}" if exact else f"compute_{max(older)}"
        prog = self._rtc("nvrtcCreateProgram", nv.nvrtcCreateProgram(source, _KERNEL_SOURCE.encode(), 0, [], []))
        try:
            opts = [f"--gpu-architecture={arch}".encode()]
            err = nv.nvrtcCompileProgram(prog, len(opts), opts)[0]
            if err != nv.nvrtcResult.NVRTC_SUCCESS:
                size = self._rtc("nvrtcGetProgramLogSize", nv.nvrtcGetProgramLogSize(prog))
                log = b" " * size
                self._rtc("nvrtcGetProgramLog", nv.nvrtcGetProgramLog(prog, log))
                text = log.decode(errors="replace").strip(" \0")
                raise LoadError(f"NVRTC could not compile {_KERNEL_SOURCE} for {arch}: {text}",
                                call="nvrtcCompileProgram", code=int(err))
            if exact:
                size = self._rtc("nvrtcGetCUBINSize", nv.nvrtcGetCUBINSize(prog))
                image = b" " * size
                self._rtc("nvrtcGetCUBIN", nv.nvrtcGetCUBIN(prog, image))
            else:
                size = self._rtc("nvrtcGetPTXSize", nv.nvrtcGetPTXSize(prog))
                image = b" " * size
                self._rtc("nvrtcGetPTX", nv.nvrtcGetPTX(prog, image))
        finally:
            nv.nvrtcDestroyProgram(prog)
        return image, arch

    def _launch(self, fn: Any, grid: int, block: int, args: list[tuple[type, int]]) -> None:
        # cuLaunchKernel takes an array of pointers to the argument values; the arrays live until it returns.
        values: list[np.ndarray] = [np.array([v], dtype=t) for t, v in args]
        pointers = np.array([v.ctypes.data for v in values], dtype=np.uint64)
        self._call("cuLaunchKernel", self._driver.cuLaunchKernel(
            fn, grid, 1, 1, block, 1, 1, 0, self._stream, pointers.ctypes.data, 0))

    @contextmanager
    def _current(self) -> Iterator[None]:
        # Push/pop rather than set: the caller's current context (torch's, maybe) is restored afterwards.
        self._call("cuCtxPushCurrent", self._driver.cuCtxPushCurrent(self._ctx))
        try:
            yield
        finally:
            self._driver.cuCtxPopCurrent()

    def _call(self, call: str, result: Any) -> Any:
        """The one check of every CUDA driver call: raise LoadError naming the call and CUDA's error string."""
        err, values = _unpack(result)
        code = int(err)
        if code != 0:
            name = self._driver.cuGetErrorName(err)
            text = self._driver.cuGetErrorString(err)
            name_s = name[1].decode() if int(name[0]) == 0 and name[1] else f"CUresult {code}"
            text_s = text[1].decode() if int(text[0]) == 0 and text[1] else "unknown error"
            raise LoadError(f"{call} failed: {name_s}: {text_s}. {_cuda_advice(code)}", call=call, code=code)
        return _result_value(values)

    def _rtc(self, call: str, result: Any) -> Any:
        """The same check for NVRTC calls."""
        nv = self._nvrtc
        err, values = _unpack(result)
        if err != nv.nvrtcResult.NVRTC_SUCCESS:
            text = nv.nvrtcGetErrorString(err)
            text_s = text[1].decode() if int(text[0]) == 0 else f"nvrtcResult {int(err)}"
            raise LoadError(f"{call} failed: {text_s}", call=call, code=int(err))
        return _result_value(values)


def _unpack(result: Any) -> tuple[Any, list[Any]]:
    """cuda.bindings returns ``(error, value, ...)``, or the bare error when there is no value."""
    if isinstance(result, tuple):
        return result[0], list(result[1:])
    return result, []


def _result_value(values: list[Any]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_advice(code: int) -> str:
    if code in (100, 101):  # no device, invalid device
        return "No usable CUDA GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES."
    if code == 35:  # insufficient driver
        return "The NVIDIA driver is older than this cuda-bindings release needs: update the driver or install an " \
               "older cuda-bindings."
    if code == 2:
        return "The GPU is out of memory."
    return "Run `wattscope doctor`, and retry on an idle GPU."


def _import_cuda() -> tuple[Any, Any]:
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as e:
        raise LoadError(
            f"the calibration load needs cuda-python's bindings ({e}): pip install cuda-bindings (or cuda-python) "
            "matching your CUDA driver's major version"
        ) from e
    try:
        # cuda.bindings opens libcuda and libnvrtc on first use; fail here, with advice, not in the middle.
        driver.cuDriverGetVersion()
    except Exception as e:  # cuda.bindings raises RuntimeError or its own loader errors, not a CUresult
        raise LoadError(f"the CUDA driver library could not be loaded ({e}): is the NVIDIA driver installed?") from e
    try:
        nvrtc.nvrtcVersion()
    except Exception as e:
        if _find_fatbin() is None:
            raise LoadError(
                f"NVRTC could not be loaded ({e}) and this install has no prebuilt kernels: pip install "
                "nvidia-cuda-nvrtc (or cuda-python), or build wattscope with a CUDA compiler present"
            ) from e
    return driver, nvrtc


def _find_fatbin() -> Path | None:
    from .._session import native_file

    try:
        path = native_file(f"calibration/{_FATBIN}")
    except WattscopeError:  # the compiled module is missing: nothing was built beside it either
        return None
    return path if path.exists() else None


class FakeLoad:
    """The same interface on the fake NVML: the device's true power follows the schedule (``low_w`` when quiet,
    ``high_w`` when busy), and ``run`` sleeps through it.

    The trace keeps the device's origin (the energy counter's zero and the sample grid's phase) and every interval
    run so far, so readings taken earlier stay consistent with the trace."""

    def __init__(self, fake: Any, device: int = 0, *, low_w: float = 120.0, high_w: float = 450.0,
                 cuda_index: int = 0) -> None:
        if not 0 <= low_w < high_w:
            raise ValueError(f"need 0 <= low_w < high_w, got {low_w}, {high_w}")
        self.fake = fake
        self.device = device
        self.low_w = float(low_w)
        self.high_w = float(high_w)
        self.cuda_index = cuda_index
        self.uuid: str | None = None
        self.description = f"fake load on fake NVML device {device} ({low_w:g} W quiet, {high_w:g} W busy)"
        self._origin_ns = fake.origin_mono_ns(device)
        self._edges_s: list[float] = []
        fake.set_trace(device, [0.0], [self.low_w], origin_mono_ns=self._origin_ns)

    def run(self, busy_ns: np.ndarray, end_ns: int) -> LoadRun:
        busy = validate_schedule(busy_ns, end_ns, time.monotonic_ns())
        if self._edges_s and (busy[0, 0] - self._origin_ns) / 1e9 < self._edges_s[-1]:
            raise ValueError("a FakeLoad schedule must start after the previous one ended")
        self._edges_s.extend(((busy.reshape(-1) - self._origin_ns) / 1e9).tolist())
        levels = [self.high_w, self.low_w] * (len(self._edges_s) // 2)
        self.fake.set_trace(self.device, [0.0] + self._edges_s, [self.low_w] + levels, origin_mono_ns=self._origin_ns)
        start_ns = time.monotonic_ns()
        wait_ns = int(end_ns) - start_ns
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        return LoadRun(busy, start_ns, max(int(end_ns), time.monotonic_ns()), 0, 0)

    def close(self) -> None:
        """Nothing to free (the fake keeps its trace until reset)."""

    def __enter__(self) -> FakeLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
