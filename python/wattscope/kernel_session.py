"""Kernel tracing for PowerMeter: one process-wide CUPTI tracer, shared by every meter opened with ``kernels=``.

Like the sampler thread, the tracer is owned by the session and reference-counted: the first meter with kernels
starts it, the last one to close stops it. Each meter takes its records at its own ``stop`` (after a forced flush, so
the kernels that ended inside the window are in), which makes nested and concurrent kernel meters independent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import WattscopeError
from .kernels import KernelTimeline

CUPTI_PATH_ENV = "WATTSCOPE_CUPTI_PATH"
# CUPTI_ACTIVITY_KIND_*: the tracer records kernels (3, 10), memcpy (1) and memset (2).
_KIND_MEMCPY = 1
_KIND_MEMSET = 2
# Records just outside the window explain readings near its edges (the model estimator uses them): keep one second.
_EDGE_NS = 1_000_000_000


class KernelTracingUnavailableError(WattscopeError):
    """``PowerMeter(kernels=True)`` could not trace kernels: CUPTI is missing or refused to start."""


def _unavailable(cause: Exception) -> KernelTracingUnavailableError:
    return KernelTracingUnavailableError(
        f"kernel tracing is unavailable: {cause}. Install CUPTI (`pip install nvidia-cuda-cupti-cu12`, or a CUDA build "
        f"of torch), or set {CUPTI_PATH_ENV}=/path/to/libcupti.so; use PowerMeter(kernels='auto') to measure energy "
        "alone when tracing is not possible."
    )


class KernelTracing:
    """The session's tracer: ``acquire`` starts it on first use, ``release`` stops it after the last user."""

    def __init__(self, core: Any) -> None:
        self._core = core
        self._lock = threading.Lock()
        self._cupti: Any = None
        self._tracer: Any = None
        self._users = 0
        self._options: dict[str, Any] = {}

    def configure(self, **options: Any) -> None:
        """KernelTracer options (``buffer_bytes``, ``buffer_count``, ``capacity``, ...) for the next start."""
        with self._lock:
            self._options = dict(options)

    def acquire(self) -> Any:
        """The running tracer (started if needed). Raises KernelTracingUnavailableError."""
        with self._lock:
            if self._tracer is None:
                try:
                    if self._cupti is None:
                        # An empty path lets the native loader honour WATTSCOPE_CUPTI_PATH, then search.
                        self._cupti = self._core.Cupti("")
                    tracer = self._core.KernelTracer(self._cupti, **self._options)
                    tracer.start()
                except WattscopeError as e:
                    raise _unavailable(e) from e
                # A fresh tracer per run: a stopped one's records must not leak into the next meter's window.
                self._tracer = tracer
            self._users += 1
            return self._tracer

    def release(self, tracer: Any) -> None:
        with self._lock:
            if tracer is not self._tracer:
                return  # a tracer from before a shutdown: already stopped
            self._users -= 1
            if self._users == 0:
                self._tracer = None
                tracer.stop()

    def shutdown(self) -> None:
        with self._lock:
            tracer, self._tracer, self._users = self._tracer, None, 0
        if tracer is not None:
            tracer.stop()


@dataclass(frozen=True, eq=False)
class KernelCapture:
    """What a meter recorded: the records around its window (all devices), or why there are none."""

    timeline: KernelTimeline | None
    unavailable: str | None = None
    failures: tuple[str, ...] = ()


def timeline_from_snapshot(snap: dict, start_ns: int, stop_ns: int) -> KernelTimeline:
    """The tracer's records overlapping ``[start_ns - 1 s, stop_ns + 1 s]`` as a KernelTimeline.

    ``dropped`` counts every record the tracer lost (refused buffers, overflow, incomplete) since it started: CUPTI
    does not say when a lost record ran, so a loss before this window is counted here too (it overstates, never
    hides)."""
    keep = (snap["end_ns"] >= start_ns - _EDGE_NS) & (snap["start_ns"] <= stop_ns + _EDGE_NS)
    names = snap["names"]
    kind_codes = snap["kind"][keep]
    labels = np.where(kind_codes == _KIND_MEMCPY, "memcpy", np.where(kind_codes == _KIND_MEMSET, "memset", "kernel"))
    index = snap["name_index"][keep].tolist()
    name = [names[i] if i >= 0 else f"[{k}]" for i, k in zip(index, labels.tolist(), strict=True)]
    dropped = int(snap["records_dropped"]) + int(snap["records_overflow"]) + int(snap["records_incomplete"])
    return KernelTimeline(
        snap["start_ns"][keep],
        snap["end_ns"][keep],
        np.array(name, dtype=object),
        snap["stream_id"][keep].astype(np.int64),
        snap["device_id"][keep].astype(np.int64),
        labels.astype(object),
        None,
        dropped,
    )


def open_tracer(session: Any, mode: bool | str) -> tuple[Any, KernelCapture | None]:
    """For a meter's start: the running tracer, or (``mode="auto"`` only) why there is none."""
    try:
        return session.kernel_tracing().acquire(), None
    except KernelTracingUnavailableError as e:
        if mode != "auto":
            raise
        return None, KernelCapture(None, str(e))


def close_tracer(session: Any, tracer: Any, start_ns: int, stop_ns: int) -> KernelCapture:
    """For a meter's stop (after its CUDA sync): flush what CUPTI holds, take the window's records, release."""
    try:
        # Forced: CUPTI hands over partly filled buffers too, so the kernels that ended just before stop are in.
        tracer.flush(True)
        snap = tracer.snapshot()
        failures = tuple(f"{f['call']}: {f['message']} (CUPTI code {f['code']})" for f in tracer.failures())
    finally:
        session.kernel_tracing().release(tracer)
    return KernelCapture(timeline_from_snapshot(snap, start_ns, stop_ns), failures=failures)


def attribute_gpu(
    capture: KernelCapture | None, gpu: Any, start_ns: int, stop_ns: int, driver: str, method: str | None, group_by: str
) -> Any:
    """The Attribution of one measured GPU (a GpuEnergy): its readings, its sensor model's response, and the
    records of its CUDA ordinal."""
    from dataclasses import replace

    from .errors import MeasurementError
    from .kernels import attribute
    from .sensor import sensor_model

    if capture is None:
        raise MeasurementError("this meter traced no kernels: open it with PowerMeter(kernels=True)")
    if capture.timeline is None:
        raise MeasurementError(f"no kernel timeline: {capture.unavailable}")
    if gpu.cuda_index is None:
        raise MeasurementError(f"GPU {gpu.name} ({gpu.uuid}) is not visible to CUDA: no kernels can be matched to it")
    if gpu.source == "energy_counter":
        raise MeasurementError("kernel attribution needs power readings; this GPU only offered its energy counter")
    response = sensor_model(gpu.name, driver, gpu.source).response
    notes: tuple[str, ...] = ()
    if method is None:
        method = "model" if response is not None else "overlap"
        if response is None:
            notes = (
                "method 'overlap' chosen: the sensor response of this GPU is not characterised (run wattscope "
                "calibrate to enable method='model')",
            )
    # attribute() aligns the stamps itself from the response, so it takes the raw stamps the Measurement integrated.
    att = attribute(
        capture.timeline.for_device(gpu.cuda_index),
        gpu.t_ns,
        gpu.power_w,
        start_ns,
        stop_ns,
        response=response,
        method=method,
        group_by=group_by,
    )
    notes += tuple(f"kernel tracer failure: {f}" for f in capture.failures)
    return replace(att, notes=att.notes + notes) if notes else att
