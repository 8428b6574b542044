"""Kernel tracing for PowerMeter: one process-wide CUPTI tracer, shared by every meter opened with ``kernels=``.

Like the sampler thread, the tracer is owned by the session and reference-counted: the first meter with kernels
starts it, the last one to close stops it. Each meter takes its records at its own ``stop`` (after a forced flush, so
the kernels that ended inside the window are in), which makes nested and concurrent kernel meters independent.

CUPTI has one client at a time. While torch.profiler runs, wattscope steps aside (profiler_guard.py) and the time is
reported as ``[untraced]``; under Nsight or compute-sanitizer (``CUDA_INJECTION64_PATH`` set) it does not trace at
all and says so.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import profiler_guard
from .errors import WattscopeError
from .kernels import KernelTimeline
from .ranges import RangeRecorder, hook_torch_nvtx, range_ids

CUPTI_PATH_ENV = "WATTSCOPE_CUPTI_PATH"
# Set by Nsight Systems, Nsight Compute and compute-sanitizer to load themselves into the process as CUPTI clients.
_INJECTION_ENV = "CUDA_INJECTION64_PATH"
# CUPTI_ACTIVITY_KIND_*: the tracer records kernels (3, 10), memcpy (1) and memset (2).
_KIND_MEMCPY = 1
_KIND_MEMSET = 2
# Records just outside the window explain readings near its edges (the model estimator uses them): keep one second.
_EDGE_NS = 1_000_000_000
# 8 buffers of 4 MiB hold ~150k records: at 0.25 s a flush, a workload would need 600k kernels/s to run them dry.
_FLUSH_PERIOD_S = 0.25
_RANGES_NOT_ASKED = ("this window was traced without ranges: the first kernel meter of the tracing run decides, so "
                     "open the outermost one with PowerMeter(kernels=True, ranges=True)")


class KernelTracingUnavailableError(WattscopeError):
    """``PowerMeter(kernels=True)`` could not trace kernels: CUPTI is missing or refused to start."""


def _unavailable(cause: Exception) -> KernelTracingUnavailableError:
    return KernelTracingUnavailableError(
        f"kernel tracing is unavailable: {cause}. Install CUPTI (`pip install nvidia-cuda-cupti-cu12`, or a CUDA build "
        f"of torch), or set {CUPTI_PATH_ENV}=/path/to/libcupti.so; use PowerMeter(kernels='auto') to measure energy "
        "alone when tracing is not possible."
    )


@dataclass(frozen=True, eq=False)
class Lease:
    """A meter's hold on the session's tracing, from ``KernelTracing.acquire``; ``run`` tells tracing runs apart
    (a shutdown ends one), so a lease from before a shutdown releases nothing. ``ranges``: whether this run records
    user ranges (the first meter of a run decides)."""

    run: int
    ranges: bool = False


@dataclass(frozen=True, eq=False)
class KernelCapture:
    """What a meter recorded: the records around its window (all devices), or why there are none.

    ``untraced`` lists the stretches of the window in which another CUPTI client (torch.profiler) held the activity
    API, as ``(start_ns, stop_ns, holder)``: kernels ran there unseen, so attribution puts that time in its own
    ``[untraced]`` row instead of ``[idle]``.

    ``ranges``: (name, parent id) of the user ranges the records' ``range_id`` refer to (ranges.py), or None when
    the window was not traced with ranges (``ranges_unavailable`` then says why); ``ranges_overflow`` counts entries
    not recorded, ``range_pairs_lost`` the tracer's (launch, range) pairs past its capacity."""

    timeline: KernelTimeline | None
    unavailable: str | None = None
    failures: tuple[str, ...] = ()
    untraced: tuple[tuple[int, int, str], ...] = ()
    ranges: dict[int, tuple[str, int]] | None = None
    ranges_unavailable: str | None = None
    ranges_overflow: int = 0
    range_pairs_lost: int = 0


class KernelTracing:
    """The session's tracing: ``acquire`` starts it on first use, ``release`` stops it after the last user.

    While torch.profiler holds CUPTI (``profiler_guard`` calls ``suspend``/``resume``) the tracer is stopped and a
    new one started after; every tracer of the current run is kept as a segment, so a window spanning a profiler
    session gets the records from before and after it, and the stretch in between as untraced."""

    def __init__(self, core: Any, sampler: Callable[[], Any]) -> None:
        self._core = core
        self._sampler = sampler  # the session's sampler, whose thread flushes the recording tracer
        self._lock = threading.RLock()
        self._cupti: Any = None
        self._options: dict[str, Any] = {}
        self._users = 0
        self._run = 0
        self._active: Any = None  # the recording KernelTracer; None while idle or suspended
        self._segments: list[Any] = []  # every tracer of this run, stopped ones included (their records stay)
        self._untraced: list[list[Any]] = []  # [start_ns, stop_ns or None while open, holder]
        self._held_by: str | None = None  # who holds CUPTI now instead of us
        self._pid = os.getpid()  # a forked child's profiler must not drive the parent's tracers
        self.ranges = RangeRecorder()
        self._ranges_on = False  # this run's tracers record user ranges
        self._ranges_why = _RANGES_NOT_ASKED  # why this run records no ranges

    def configure(self, **options: Any) -> None:
        """KernelTracer options (``buffer_bytes``, ``buffer_count``, ``capacity``, ``range_pair_capacity``, ...) for
        the next start."""
        if "ranges" in options:
            raise ValueError("ranges are asked for per meter: PowerMeter(kernels=True, ranges=True)")
        with self._lock:
            self._options = dict(options)

    def acquire(self, ranges: bool = False) -> Lease:
        """Hold the tracing (started if needed, recording user ranges when ``ranges``; a run already going keeps
        its setting, which the lease reports). Raises KernelTracingUnavailableError when CUPTI cannot start."""
        profiler_guard.watch(self)
        with self._lock:
            if self._users == 0:
                self._ranges_on, self._ranges_why = ranges, _RANGES_NOT_ASKED
                self._segments, self._untraced = [], []
                # Asked afresh at every first use: a holder remembered from an earlier run may have gone without
                # telling us (a profiler that began before the wrappers were installed).
                self._held_by = profiler_guard.HOLDER if profiler_guard.profiler_active() else None
                if self._held_by is not None:
                    self._untraced.append([self._core.mono_ns(), None, f"{self._held_by} held CUPTI"])
                else:
                    self._start()
            self._users += 1
            return Lease(self._run, self._ranges_on)

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.run != self._run or self._users == 0:
                return  # a lease from before a shutdown: already stopped
            self._users -= 1
            if self._users == 0:
                self._stop_run()

    def capture(self, lease: Lease, start_ns: int, stop_ns: int) -> KernelCapture:
        """The records around ``[start_ns, stop_ns]`` from every segment (after a forced flush of the recording
        one, so the kernels that ended just before stop are in), and the untraced stretches inside it."""
        with self._lock:
            if lease.run != self._run:
                return KernelCapture(None, "kernel tracing was shut down before this window ended")
            if self._active is not None:
                # Forced: CUPTI hands over partly filled buffers too.
                self._active.flush(True)
            snaps = [t.snapshot() for t in self._segments]
            failures = tuple(f"{f['call']}: {f['message']} (CUPTI code {f['code']})"
                             for t in self._segments for f in t.failures())
            twice = sum(int(snap["buffers_duplicate"]) for snap in snaps)
            if twice:
                # Seen nowhere yet; counted because a buffer handed back twice once meant heap corruption elsewhere.
                failures += (f"CUPTI handed {twice} activity buffers back twice: ignored (their records counted "
                             "once)",)
            untraced = tuple((max(int(a), start_ns), min(stop_ns if b is None else int(b), stop_ns), holder)
                             for a, b, holder in self._untraced if a < stop_ns and (b is None or b > start_ns))
            ranges_on, ranges_why = lease.ranges, self._ranges_why  # a lease carries its run's setting
            ranges, overflow, lost = None, 0, 0
            if ranges_on:  # under the lock: a shutdown resets the recorder
                ids = np.unique(np.concatenate([snap["range_id"] for snap in snaps])) if snaps else []
                ranges, overflow = self.ranges.lookup(ids)
                lost = sum(int(snap["range_pairs_lost"]) for snap in snaps)
        parts = [timeline_from_snapshot(snap, start_ns, stop_ns, with_ranges=ranges_on) for snap in snaps]
        timeline = KernelTimeline.concat(parts)
        return KernelCapture(
            timeline, failures=failures, untraced=untraced, ranges=ranges,
            ranges_unavailable=None if ranges_on else ranges_why, ranges_overflow=overflow, range_pairs_lost=lost,
        )

    def suspend(self, holder: str) -> None:
        """Another client is about to take CUPTI: stop recording (the forced flush in stop returns our buffers
        while our callbacks are still the registered ones) and mark the time untraced."""
        with self._lock:
            if self._held_by is not None or os.getpid() != self._pid:
                return
            self._held_by = holder
            if self._users == 0:
                return
            if self._active is not None:
                self._stop_active()
            if not (self._untraced and self._untraced[-1][1] is None):  # a failed restart's stretch is still open
                self._untraced.append([self._core.mono_ns(), None, f"{holder} held CUPTI"])

    def resume(self) -> None:
        """The other client let CUPTI go: close the untraced stretch and record again."""
        with self._lock:
            if self._held_by is None or os.getpid() != self._pid:
                return
            self._held_by = None
            if self._users == 0:
                return
            now_ns = self._core.mono_ns()
            for stretch in self._untraced:
                if stretch[1] is None:
                    stretch[1] = now_ns
            try:
                self._start()
            except KernelTracingUnavailableError as e:
                self._untraced.append([now_ns, None, f"tracing did not restart after torch.profiler: {e}"])

    def shutdown(self) -> None:
        with self._lock:
            self._stop_run()
            self._users = 0

    def _start(self) -> None:
        try:
            if self._cupti is None:
                # An empty path lets the native loader honour WATTSCOPE_CUPTI_PATH, then search.
                self._cupti = self._core.Cupti("")
                global _loaded_cupti
                _loaded_cupti = (os.getpid(), self._cupti)
            if self._ranges_on and not self._cupti.has_ranges:
                # Kernels without ranges rather than no kernels at all.
                self._ranges_on = False
                self._ranges_why = (f"this libcupti ({self._cupti.path}) has no external correlation API, which "
                                    "ranges need (CUDA 8 or later)")
            tracer = self._core.KernelTracer(self._cupti, **self._options, ranges=self._ranges_on)
            tracer.start()
        except WattscopeError as e:
            raise _unavailable(e) from e
        self._active = tracer
        self._segments.append(tracer)
        # CUPTI's buffers must come back while a long window runs, or the pool runs dry and records are dropped.
        self._core.set_tracer_flush(self._sampler(), tracer, _FLUSH_PERIOD_S)
        if self._ranges_on:
            try:
                self.ranges.attach(self._cupti)
                hook_torch_nvtx(self.ranges)
            except Exception:
                self._stop_active()  # no tracer left recording for a start that failed
                self._segments.pop()
                raise

    def _stop_active(self) -> None:
        self._core.set_tracer_flush(self._sampler(), None)
        if self._ranges_on:
            self.ranges.detach()
        self._active.stop()
        self._active = None

    def _stop_run(self) -> None:
        if self._active is not None:
            self._stop_active()
        self._segments, self._untraced = [], []
        self.ranges.reset()
        self._run += 1


# The CUPTI this process loaded last (pid, handle): CUPTI's state is process-global, and a session reset keeps it.
_loaded_cupti: tuple[int, Any] | None = None
_detached = False


def detach_at_exit() -> int | None:
    """For the interpreter's exit, after the session stopped its tracing: if a torch.profiler session left Kineto's
    CUPTI subscriber behind (profiler_guard.kineto_left_attached), detach CUPTI (cuptiFinalize) before the CUDA
    runtime's own exit handler releases its context into that subscriber (a double free otherwise; profiler_guard's
    docstring). Not while a profiler still runs (finalising would pull CUPTI from under it), not in a forked child,
    and once per process. Returns cuptiFinalize's code, or None when it was not called."""
    global _detached
    if _detached or _loaded_cupti is None or _loaded_cupti[0] != os.getpid():
        return None
    if not profiler_guard.kineto_left_attached() or profiler_guard.profiler_active():
        return None
    _detached = True
    return int(_loaded_cupti[1].finalize())


def timeline_from_snapshot(snap: dict, start_ns: int, stop_ns: int, *, with_ranges: bool = False) -> KernelTimeline:
    """The tracer's records overlapping ``[start_ns - 1 s, stop_ns + 1 s]`` as a KernelTimeline (with each record's
    user range when ``with_ranges``).

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
        range_ids(snap["correlation_id"][keep], snap["range_correlation_id"], snap["range_id"]) if with_ranges
        else None,
    )


def open_tracer(session: Any, mode: bool | str, ranges: bool = False) -> tuple[Lease | None, KernelCapture | None]:
    """For a meter's start: a lease on the session's tracing, or (``mode="auto"``, or a profiling tool that owns
    CUPTI) why there is none."""
    injected = os.environ.get(_INJECTION_ENV)
    if injected:
        # Nsight Systems/Compute and compute-sanitizer inject themselves as CUPTI's client: taking the activity API
        # from them would break the tool the user is running.
        why = (f"kernel tracing is off: a CUDA tool is injected into this process ({_INJECTION_ENV}={injected}, "
               "e.g. Nsight or compute-sanitizer) and owns CUPTI; energy is measured without kernels")
        warnings.warn(why, stacklevel=4)
        return None, KernelCapture(None, why)
    try:
        return session.kernel_tracing().acquire(ranges), None
    except KernelTracingUnavailableError as e:
        if mode != "auto":
            raise
        return None, KernelCapture(None, str(e))


def close_tracer(session: Any, lease: Lease, start_ns: int, stop_ns: int) -> KernelCapture:
    """For a meter's stop (after its CUDA sync): the window's records, then release the lease."""
    tracing = session.kernel_tracing()
    try:
        return tracing.capture(lease, start_ns, stop_ns)
    finally:
        tracing.release(lease)


def attribute_gpu(
    capture: KernelCapture | None, gpu: Any, start_ns: int, stop_ns: int, driver: str, method: str | None, group_by: str
) -> Any:
    """The Attribution of one measured GPU (a GpuEnergy): its readings, its sensor model's response, and the
    records of its CUDA ordinal."""
    from dataclasses import replace

    from .errors import MeasurementError
    from .kernels import WindowTooShortError, attribute
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
    chose_default = method is None
    if method is None:
        method = "model" if response is not None else "overlap"
        if response is None:
            notes = (
                "method 'overlap' chosen: the sensor response of this GPU is not characterised (run wattscope "
                "calibrate to enable method='model')",
            )
    # attribute() aligns the stamps itself, so it takes the raw stamps the Measurement integrated.
    timeline = capture.timeline.for_device(gpu.cuda_index)
    if capture.untraced:  # torch.profiler's sessions, one after another: the stretches do not overlap
        stretches = [(a, b) for a, b, _ in capture.untraced]
        timeline = KernelTimeline.concat([timeline, KernelTimeline.untraced(stretches, gpu.cuda_index)])
        total_ns = sum(b - a for a, b in stretches)
        reasons = sorted({h for _, _, h in capture.untraced})
        notes += (f"kernels were not traced for {total_ns / 1e9:.3f} s of the window ({'; '.join(reasons)}): that "
                  "time's energy is the [untraced] row",)

    # The Measurement's own period and stamp shift: with the readings' median spacing instead, a short window's
    # rows missed its energy by 0.7 % once (H100, session 8), and a polled source's shift differs.
    period_ns = round(gpu.sample_period_s * 1e9) if gpu.sample_period_s else None

    def run(chosen: str) -> Any:
        return attribute(timeline, gpu.t_ns, gpu.power_w, start_ns, stop_ns, response=response, method=chosen,
                         group_by=group_by, period_ns=period_ns, shift_ns=gpu.sensor_shift_ns)

    try:
        att = run(method)
    except WindowTooShortError as e:
        if not chose_default:
            raise
        # The default must give an answer for any window: a window of a few sample periods has too few readings to
        # fit per-class powers, and the overlap split is then the best there is.
        att = run("overlap")
        notes += (f"method 'overlap' chosen: {e.reason}",)
    notes += tuple(f"kernel tracer failure: {f}" for f in capture.failures)
    return replace(att, notes=att.notes + notes) if notes else att
