"""PowerMeter: a window over the process-wide sample timeline, turned into a Measurement on demand.

``start``/``stop`` only read the clock and hold/release the shared sampler thread, so they cost microseconds; the
work (waiting for the sensor samples that cover the window's end, integrating) happens when ``result`` is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import _session, energy, kernel_session
from .devices import DeviceSelector, GpuInfo, resolve
from .errors import GpuLostError, MeasurementError, nvml_error
from .measurement import GpuEnergy, GpuTrace, Measurement
from .sensor import SensorModel, sensor_model

F = TypeVar("F", bound=Callable[..., Any])

# How long after a window's end the readings that cover it arrive: a sample period and the fetch latency
# (measurement-facts §1: the newest sample is ~8 ms old when fetched), on top of the sensor's own lag.
_COVER_MARGIN_NS = 25_000_000
# The raw series a trace holds, with the factor that turns NVML's integers into SI units.
_TRACE_SERIES = (("samples", 1e-3), ("instant", 1e-3), ("average", 1e-3), ("energy_counter", 1e-3),
                 ("sm_clock", 1.0), ("temperature", 1.0))

# Power sources in order of preference (measurement-facts §1): the ~20 ms buffered stream, then the instant field,
# then the 1 s average, then the energy counter alone.
SOURCES = ("samples", "instant", "average", "energy_counter")
_SOURCE_CAVEAT = {
    "instant": "fallback source 'instant': a field refreshed every ~100 ms that may average only part of that time",
    "average": "fallback source 'average': a 1 s moving average, lagging short windows by ~0.5 s",
    "energy_counter": "fallback source 'energy_counter': updates every ~100 ms",
}


@dataclasses.dataclass(frozen=True)
class LivePower:
    """The newest reading of one GPU (``PowerMeter.live``): ``source`` is None and ``power_w`` nan before any."""

    cuda_index: int | None
    uuid: str
    power_w: float
    age_s: float
    source: str | None


class MeasurementWarning(UserWarning):
    """A measurement finished but something about it deserves attention (a lost GPU, poor coverage)."""


class PowerMeter:
    """Measure the energy of GPU work.

    ``with PowerMeter() as m: ...`` then ``m.result``; or ``m.start()`` / ``m.stop()``; or decorate a function with a
    meter (``@m``) to measure every call (``m.results``).

    devices: ``None`` (every GPU visible to CUDA), ``"all"``, a CUDA index, a UUID or bus id, or a list of these.
    sync_cuda: when torch has initialised CUDA, synchronise the measured GPUs at both edges, so the window holds the
        GPU work launched inside it rather than the time the host took to queue it.
    wait_timeout_s: how long ``result`` may wait for the sensor samples that cover the window's end.
    strict: raise ``GpuLostError`` (with the partial measurement attached) instead of warning when a GPU fails.
    kernels: ``True`` traces the GPU kernels with CUPTI (``m.kernels``: energy per kernel); start raises
        ``KernelTracingUnavailableError`` when CUPTI is missing. ``"auto"``: trace when possible, else measure energy
        alone and say so in the result's ``uncertainty_reasons``. Tracing costs ~0.3 us of GPU time per kernel
        and 0.5-1.6 us of host time per launch (H100): ~2 % on GPU-bound code, more where the host's launches set
        the pace (bench/RESULTS.md).
    ranges: with ``kernels``, also record user ranges: ``torch.cuda.nvtx.range`` / ``range_push`` / ``range_pop``
        and ``phase()``; ``m.ranges`` gives energy per range (ranges.py). It costs a CUPTI record per CUDA call, so
        it is off by default (bench/RESULTS.md has the measured cost).
    """

    def __init__(
        self,
        devices: DeviceSelector = None,
        *,
        name: str | None = None,
        sync_cuda: bool = True,
        wait_timeout_s: float = 1.0,
        strict: bool = False,
        kernels: bool | str = False,
        ranges: bool = False,
    ) -> None:
        if kernels not in (False, True, "auto"):
            raise ValueError(f"kernels must be True, False or 'auto', got {kernels!r}")
        if ranges not in (False, True):
            raise ValueError(f"ranges must be True or False, got {ranges!r}")
        if ranges and not kernels:
            raise ValueError("ranges=True needs kernel tracing: PowerMeter(kernels=True, ranges=True)")
        if wait_timeout_s < 0 or not math.isfinite(wait_timeout_s):
            raise ValueError(f"wait_timeout_s must be a non-negative number of seconds, got {wait_timeout_s!r}")
        self.devices = devices
        self.name = name
        self.sync_cuda = sync_cuda
        self.wait_timeout_s = wait_timeout_s
        self.strict = strict
        self._gpus: list[GpuInfo] | None = None
        self._slots: list[int] = []
        self._session: _session.Session | None = None
        self._start_ns: int | None = None
        self._stop_ns: int | None = None
        self._result: Measurement | None = None
        self._calls: list[PowerMeter] = []
        self._calls_lock = threading.Lock()
        self._phases: list[PowerMeter] = []  # phase() windows of the current window, in the order they opened
        # -- kernel tracing (kernel_session.py) --
        self._kernels_mode = kernels
        self._ranges_mode = ranges
        self._kernel_tracer: Any = None
        self._kernel_capture: kernel_session.KernelCapture | None = None
        self._attributions: dict[tuple, Any] = {}
        # -- end kernel tracing --

    # -- the window -------------------------------------------------------------------------------------------------

    def _bind(self) -> None:
        session = _session.current()
        if self._session is not session:
            # First use, or first use in a forked child: resolve against this process's NVML.
            self._gpus = resolve(session.nvml(), self.devices)
            self._slots = [session.slot(g.nvml_index) for g in self._gpus]
            self._session = session

    def start(self) -> PowerMeter:
        """Open the window. Raises MeasurementError if it is already open."""
        if self._start_ns is not None and self._stop_ns is None:
            raise MeasurementError("PowerMeter.start() called twice without stop(); use one meter per window")
        self._bind()
        assert self._session is not None and self._gpus is not None
        # -- kernel tracing: before the sampler is held, so that a missing CUPTI leaves nothing to undo --
        self._kernel_tracer, self._kernel_capture, self._attributions = None, None, {}
        if self._kernels_mode:
            self._kernel_tracer, self._kernel_capture = kernel_session.open_tracer(
                self._session, self._kernels_mode, self._ranges_mode)
        # -- end kernel tracing --
        self._session.sampler().acquire()
        self._sync()
        self._result = None
        with self._calls_lock:
            self._phases = []
        self._stop_ns = None
        self._start_ns = _session.core().mono_ns()
        # The counter is read every few seconds only (4 ms a call on H100): a reading at each edge, taken by the
        # thread, keeps the cross-check tight without putting that call on this path.
        _request_counter(self._session.sampler())
        return self

    def stop(self) -> PowerMeter:
        """Close the window. Cheap: the result is computed when ``result`` is first read."""
        if self._start_ns is None or self._stop_ns is not None:
            raise MeasurementError("PowerMeter.stop() called without a matching start()")
        self._sync()
        self._stop_ns = _session.core().mono_ns()
        assert self._session is not None
        if self._session.pid == os.getpid():
            # -- kernel tracing: after the CUDA sync above, so the window's kernels have finished --
            if self._kernel_tracer is not None:
                tracer, self._kernel_tracer = self._kernel_tracer, None
                self._kernel_capture = kernel_session.close_tracer(self._session, tracer, self._start_ns, self._stop_ns)
            # -- end kernel tracing --
            _request_counter(self._session.sampler())
            self._session.sampler().release()
        return self

    def __enter__(self) -> PowerMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __call__(self, fn: F) -> F:
        """Use the meter as a decorator: every call is measured by its own window, collected in ``results``."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            child = self._child(self.name or fn.__qualname__, self._kernels_mode, self._ranges_mode)
            with child:
                out = fn(*args, **kwargs)
            with self._calls_lock:
                self._calls.append(child)
            return out

        return wrapper  # type: ignore[return-value]

    def _child(self, name: str | None, kernels: bool | str = False, ranges: bool = False) -> PowerMeter:
        """A window over this meter's GPUs with its settings, resolved once here rather than in every child (a
        resolve enumerates the GPUs through NVML)."""
        self._bind()
        child = PowerMeter(self.devices, name=name, sync_cuda=self.sync_cuda, wait_timeout_s=self.wait_timeout_s,
                           strict=self.strict, kernels=kernels, ranges=ranges)
        child._gpus, child._slots, child._session = self._gpus, self._slots, self._session
        return child

    @property
    def running(self) -> bool:
        return self._start_ns is not None and self._stop_ns is None

    def live(self) -> tuple[LivePower, ...]:
        """The newest power reading of every measured GPU, for progress bars: one short copy out of the sampler's
        buffers per GPU (no NVML call, no waiting). Readings arrive as the thread drains them (the buffered stream
        every ~250 ms, the instant field every ~50 ms): ``age_s`` says how old each one is. Between ``start`` and
        ``stop``, or shortly after (the thread lingers a few seconds)."""
        # Bound at the first start, or (a decorator meter, which never starts itself) at its first call.
        if self._session is None:
            raise MeasurementError("live() needs a started meter: call start(), enter the with-block, or call the "
                                   "function it decorates first")
        assert self._gpus is not None
        sampler = self._session.sampler()
        now_ns = _session.core().mono_ns()
        out = []
        for g, slot in zip(self._gpus, self._slots, strict=True):
            # A zero-length range still returns the two newest points before it (the snapshot's edge margin).
            snap = sampler.snapshot(slot, now_ns, now_ns)
            newest = [(int(snap[s]["t_ns"][-1]), s, float(snap[s]["value"][-1]) / 1000.0) for s in SOURCES[:3]
                      if snap[s]["supported"] and len(snap[s]["t_ns"])]
            # The fresher of the buffered stream and the instant field; the 1 s average (stamped when read, yet a
            # second behind) only when neither exists.
            fresh = [r for r in newest if r[1] != "average"] or newest
            t_ns, source, power_w = max(fresh, key=lambda r: r[0]) if fresh else (0, None, math.nan)
            out.append(LivePower(g.cuda_index, g.uuid, power_w, (now_ns - t_ns) / 1e9 if fresh else math.inf,
                                 source))
        return tuple(out)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PowerMeter]:
        """A named stretch of the running window: ``with m.phase("decode"): ...``; ``m.phases`` sums them by name.

        Each phase is a window of its own over the same readings and GPUs, with the meter's ``sync_cuda``: the GPUs
        are synchronised at both of its edges, so a phase holds the GPU work launched inside it (what ran on the GPU
        between its edges, not the time the host took to queue it). The price is a synchronisation at each edge,
        which drains the launch queue; phases may nest and repeat, and may be entered from several threads.
        With ``ranges=True`` a phase is also a user range: ``m.ranges`` splits its energy over its kernels.
        """
        if not self.running:
            raise MeasurementError("phase() needs a running meter: use it inside `with PowerMeter() as m:` or between "
                                   "start() and stop()")
        window = self._child(name).start()
        with self._calls_lock:
            self._phases.append(window)
        try:
            if self._kernel_tracer is not None and self._kernel_tracer.ranges:
                assert self._session is not None
                with self._session.kernel_tracing().ranges.entered(name):
                    yield window
            else:
                yield window
        finally:
            window.stop()

    @property
    def phases(self) -> Any:
        """Energy per phase name as a pandas DataFrame, largest first: ``name``, ``calls``, ``time_s``, ``energy_j``,
        ``uncertainty_j`` (the calls' added in quadrature), ``mean_power_w`` and ``share`` of the window's energy.
        Nested phases are each counted in full, so shares may add up to more than 1."""
        import pandas as pd

        self._require_closed()
        with self._calls_lock:
            windows = list(self._phases)
        columns = ["name", "calls", "time_s", "energy_j", "uncertainty_j", "mean_power_w", "share"]
        rows: dict[str, list[float]] = {}
        for w in windows:
            r = w.result
            acc = rows.setdefault(str(w.name), [0, 0.0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += r.duration_s
            acc[2] += r.energy_j
            acc[3] += r.uncertainty_j**2
        total_j = self.result.energy_j
        table = pd.DataFrame(
            [[name, int(n), t, e, math.sqrt(u2), e / t if t > 0 else math.nan, e / total_j if total_j > 0 else math.nan]
             for name, (n, t, e, u2) in rows.items()],
            columns=columns,
        )
        return table.sort_values("energy_j", ascending=False, ignore_index=True)

    @property
    def results(self) -> list[Measurement]:
        """One Measurement per decorated call, in call order."""
        with self._calls_lock:
            calls = list(self._calls)
        return [c.result for c in calls]

    @property
    def result(self) -> Measurement:
        """The Measurement of the window (for a decorator: of the last call)."""
        if self._start_ns is None:
            with self._calls_lock:
                if self._calls:
                    return self._calls[-1].result
        self._require_closed()
        if self._result is None:
            self._result = self._finish()
        return self._result

    @property
    def traces(self) -> tuple[GpuTrace, ...]:
        """Every source's raw readings around the window, per GPU (for plots, calibration, your own analysis)."""
        self._require_closed()
        session = self._session
        assert session is not None and self._gpus is not None and self._start_ns is not None
        assert self._stop_ns is not None
        sampler = session.sampler()
        sampler.wait_covered(self._stop_ns + _COVER_MARGIN_NS, int(self.wait_timeout_s * 1e9))
        driver = session.driver_version()
        out = []
        for g, slot in zip(self._gpus, self._slots, strict=True):
            snap = sampler.snapshot(slot, self._start_ns, self._stop_ns)
            series = {name: (snap[name]["t_ns"], snap[name]["value"] * scale) for name, scale in _TRACE_SERIES
                      if snap[name]["supported"]}
            out.append(GpuTrace(g.cuda_index, g.nvml_index, g.name, g.uuid, driver, series))
        return tuple(out)

    # -- kernel tracing (kernel_session.py) ------------------------------------------------------------------------

    @property
    def kernels(self) -> Any:
        """Energy per kernel of the first measured GPU, as a pandas DataFrame (see ``kernel_attribution``)."""
        return self.kernel_attribution().table

    def kernel_attribution(self, cuda_index: int | None = None, method: str | None = None,
                           group_by: str = "name") -> Any:
        """The :class:`wattscope.kernels.Attribution` of one GPU (default: the first measured) over the window.

        method: ``"model"`` or ``"overlap"``; by default ``"model"`` when the GPU's sensor response is characterised,
            else ``"overlap"`` (the notes say so). Uses the readings the Measurement integrated.
        """
        m = self.result
        g = m.gpus[0] if cuda_index is None else m.gpu(cuda_index)
        key = (g.cuda_index, method, group_by)
        if key not in self._attributions:
            assert self._session is not None
            self._attributions[key] = kernel_session.attribute_gpu(
                self._kernel_capture, g, m.start_ns, m.stop_ns, self._session.driver_version(), method, group_by)
        return self._attributions[key]

    @property
    def ranges(self) -> Any:
        """Energy per user range of the first measured GPU, as a pandas DataFrame (``ranges.range_table``): one row
        per range path ("outer / inner", inclusive of nested ranges), then ``[no range]``, ``[untraced]`` (when
        torch.profiler held CUPTI), ``[idle]`` and ``[unattributed]``; the depth-0 rows and those add up to the
        window's energy. Needs ``PowerMeter(kernels=True, ranges=True)``."""
        return self.range_attribution()

    def range_attribution(self, cuda_index: int | None = None, method: str | None = None) -> Any:
        """``m.ranges`` for one GPU and estimator (see ``kernel_attribution``)."""
        from .ranges import range_table

        if not self._ranges_mode:
            raise MeasurementError("this meter recorded no ranges: open it with PowerMeter(kernels=True, ranges=True)")
        capture = self._kernel_capture
        if capture is not None and capture.timeline is not None and capture.ranges is None:
            raise MeasurementError(f"no user ranges: {capture.ranges_unavailable}")
        att = self.kernel_attribution(cuda_index, method)  # raises when nothing was traced
        assert capture is not None and capture.ranges is not None
        return range_table(att, capture.ranges, overflow=capture.ranges_overflow, pairs_lost=capture.range_pairs_lost)

    def save_trace(self, path: str | Path, *, method: str | None = None) -> Path:
        """Write the window's kernels and power readings as a Chrome/Perfetto JSON trace (``trace_export``); with
        one GPU, each kernel event carries the energy credited to it. Returns the path written."""
        from .trace_export import save_trace

        m = self.result
        series: dict[object, tuple[np.ndarray, np.ndarray]] = {
            g.cuda_index if g.cuda_index is not None else g.uuid: (g.t_ns, g.power_w) for g in m.gpus
        }
        if len(m.gpus) == 1:
            att = self.kernel_attribution(method=method)
            return save_trace(path, att.timeline, series, energy_table=att, ranges=self._range_chains(att.timeline))
        self.kernel_attribution(m.gpus[0].cuda_index, method)  # raises the clear error when nothing was traced
        assert self._kernel_capture is not None and self._kernel_capture.timeline is not None
        ordinals = [g.cuda_index for g in m.gpus if g.cuda_index is not None]
        timeline = self._kernel_capture.timeline
        timeline = timeline.take(np.isin(timeline.device, ordinals)).clip(m.start_ns, m.stop_ns)
        return save_trace(path, timeline, series, ranges=self._range_chains(timeline))

    def _range_chains(self, timeline: Any) -> dict[int, tuple[tuple[str, ...], tuple[int, ...]]] | None:
        """For save_trace: each range id of ``timeline`` with its chain of names and ids, or None without ranges."""
        from .ranges import range_chains

        capture = self._kernel_capture
        if capture is None or capture.ranges is None or timeline.range_id is None:
            return None
        return range_chains(capture.ranges, timeline.range_id)

    def plot(self, path: str | Path, *, cuda_index: int | None = None, method: str | None = None,
             top_n: int = 8) -> Path:
        """Save a PNG of one GPU's readings with its kernels and energy per kernel (``kernel_plot``)."""
        from .kernel_plot import plot_kernels

        att = self.kernel_attribution(cuda_index, method)
        g = self.result.gpus[0] if cuda_index is None else self.result.gpu(cuda_index)
        return plot_kernels(path, g.t_ns, g.power_w, att.timeline, att.table, top_n=top_n, title=self.name)

    # -- end kernel tracing -----------------------------------------------------------------------------------------

    def _require_closed(self) -> None:
        if self._start_ns is None:
            raise MeasurementError("nothing measured yet: use `with PowerMeter() as m:` or start()/stop() first")
        if self._stop_ns is None:
            raise MeasurementError("the meter is still running: read results after the with-block or stop()")
        if self._session is not None and self._session.pid != os.getpid():
            raise MeasurementError(
                "this window was opened in the parent process before fork(); measure inside the child with a new "
                "PowerMeter"
            )

    # -- internals --------------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        if not self.sync_cuda:
            return
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        n_cuda = torch.cuda.device_count()
        for g in self._gpus or ():
            # An index torch does not know (another NVML, a GPU hidden from this process) has nothing to sync.
            if g.cuda_index is not None and g.cuda_index < n_cuda:
                torch.cuda.synchronize(g.cuda_index)

    def _finish(self) -> Measurement:
        session = self._session
        assert session is not None and self._gpus is not None
        assert self._start_ns is not None and self._stop_ns is not None
        start_ns, stop_ns = self._start_ns, self._stop_ns
        sampler = session.sampler()
        driver = session.driver_version()
        models = [_models(g.name, driver) for g in self._gpus]
        # Wait for the lag of the source each GPU will use (its profile's best one), not the slowest calibrated one:
        # the 1 s average field alone would hold every result back by half a second.
        lag_ns = max((max(0, per_gpu[_preferred(per_gpu)].shift_ns(0)) for per_gpu in models), default=0)
        # The reading that covers the window's end is stamped after it, later still by the sensor's lag (and the
        # next one too, which the uncertainty uses): wait for them rather than extrapolating.
        timeout_ns = int(self.wait_timeout_s * 1e9)
        covered = sampler.wait_covered(stop_ns + lag_ns + _COVER_MARGIN_NS, timeout_ns)
        # The energy-counter cross-check needs a counter reading after the end too.
        sampler.wait_covered(stop_ns, timeout_ns, "energy_counter")
        failures = sampler.failures()
        gpus = tuple(
            _gpu_energy(g, sampler.snapshot(slot, start_ns, stop_ns + lag_ns), start_ns, stop_ns, per_gpu,
                        [f for f in failures if f["slot"] == slot and f["t_ns"] >= start_ns - 1_000_000_000])
            for g, slot, per_gpu in zip(self._gpus, self._slots, models, strict=True)
        )
        errors = tuple(e for g in gpus for e in g.errors)
        if not covered and not errors:
            errors += (f"the sensor readings covering the window's end did not arrive within {self.wait_timeout_s} s",)
        m = _combine(self.name, start_ns, stop_ns, gpus, errors)
        # -- kernel tracing --
        if self._kernel_capture is not None and self._kernel_capture.unavailable is not None:
            m = dataclasses.replace(m, uncertainty_reasons=m.uncertainty_reasons + (
                f"kernels='auto': energy only, {self._kernel_capture.unavailable}",))
        # -- end kernel tracing --
        if errors:
            if self.strict:
                err = GpuLostError("; ".join(errors))
                err.measurement = m  # type: ignore[attr-defined]
                raise err
            warnings.warn("; ".join(errors), MeasurementWarning, stacklevel=3)
        return m


# The counter itself updates every ~100 ms, so reading it more often adds nothing, while each read costs the sampler
# thread ~4 ms on H100: a decorator timing thousands of short calls a second would keep it busy reading.
_COUNTER_REQUEST_MIN_NS = 100_000_000
_last_counter_request_ns = -_COUNTER_REQUEST_MIN_NS


def _request_counter(sampler: Any) -> None:
    """Ask the sampler thread for an energy-counter reading now, at most once per counter update period."""
    global _last_counter_request_ns
    now_ns = time.monotonic_ns()
    if now_ns - _last_counter_request_ns >= _COUNTER_REQUEST_MIN_NS:
        _last_counter_request_ns = now_ns
        sampler.request_counter()


def _models(gpu_name: str, driver: str) -> dict[str, SensorModel]:
    return {source: sensor_model(gpu_name, driver, source) for source in SOURCES[:3]}


def _preferred(models: dict[str, SensorModel]) -> str:
    best = models["samples"].best_source
    return best if best in models else "samples"


def _gpu_energy(gpu: GpuInfo, snap: dict, start_ns: int, stop_ns: int, models: dict[str, SensorModel],
                failures: list[dict]) -> GpuEnergy:
    available = [s for s in SOURCES if snap[s]["supported"] and len(snap[s]["t_ns"]) > 0]
    preferred = _preferred(models)
    source = preferred if preferred in available else next(iter(available), None)
    errors = tuple(str(nvml_error(f["call"], f["code"], f["message"])) for f in failures)
    if snap["lost"] and not errors:
        errors = ("the GPU stopped answering NVML during the measurement",)
    sensor = models.get(source or "samples", models["samples"])
    counter = snap["energy_counter"]
    counter_j = energy.counter_delta_j(counter["t_ns"], counter["value"], start_ns, stop_ns) if len(
        counter["t_ns"]) else None
    clock = snap["sm_clock"]["value"]
    temp = snap["temperature"]["value"]
    common = dict(
        cuda_index=gpu.cuda_index, nvml_index=gpu.nvml_index, name=gpu.name, uuid=gpu.uuid,
        counter_energy_j=counter_j, sensor_model=sensor.origin, sensor_profile=sensor.profile_path,
        sm_clock_mhz_mean=float(np.mean(clock)) if len(clock) else None,
        temperature_c_max=float(np.max(temp)) if len(temp) else None,
    )
    duration_s = (stop_ns - start_ns) / 1e9
    if source is None:
        raise MeasurementError(
            f"no power readings cover the window on GPU {gpu.name} ({gpu.uuid})"
            + (": " + "; ".join(errors) if errors else "")
        )
    if source == "energy_counter":
        e = counter_j if counter_j is not None else math.nan
        return GpuEnergy(
            **common, source=source, energy_j=e, mean_power_w=e / duration_s if duration_s > 0 else math.nan,
            peak_power_w=math.nan, uncertainty_j=math.nan, uncertainty_reasons=(_SOURCE_CAVEAT[source],),
            coverage=1.0 if counter_j is not None else 0.0, gaps=0, gap_s=0.0, sample_period_s=None,
            n_samples=len(counter["t_ns"]), sensor_shift_ns=0, errors=errors, t_ns=counter["t_ns"],
            power_w=np.zeros(len(counter["t_ns"])),
        )
    series = snap[source]
    t_ns = series["t_ns"]
    power_w = series["value"] / 1000.0
    period_ns = snap["sample_period_ns"] if source == "samples" and snap["sample_period_ns"] > 0 else None
    spacing_ns = period_ns or (float(np.median(np.diff(t_ns))) if len(t_ns) > 1 else 0.0)
    shift_ns = sensor.shift_ns(spacing_ns, polled=source != "samples")
    try:
        we = energy.integrate_window(t_ns - shift_ns, power_w, start_ns, stop_ns, period_ns=period_ns,
                                     sensor_tau_ns=sensor.memory_ns)
    except ValueError:
        if not errors:
            raise
        # The GPU failed before any reading that covers the window was drained: nothing to integrate, and the
        # failure is what the caller must hear about (warning, or GpuLostError when strict).
        return GpuEnergy(
            **common, source=source, energy_j=math.nan, mean_power_w=math.nan, peak_power_w=math.nan,
            uncertainty_j=math.nan, uncertainty_reasons=("no readings cover the window: the GPU failed",),
            coverage=0.0, gaps=0, gap_s=0.0, sample_period_s=None, n_samples=0, sensor_shift_ns=shift_ns,
            errors=errors, t_ns=t_ns, power_w=power_w,
        )
    reasons = we.uncertainty_reasons
    sensor_period_ns = period_ns or 20_000_000
    if stop_ns - start_ns < 2 * sensor_period_ns and not any("shorter than" in r for r in reasons):
        # Said even when the readings happen to be flat: such a window cannot show what happened inside it.
        reasons += (f"window shorter than 2 sensor periods ({(stop_ns - start_ns) / 1e6:.1f} ms < "
                    f"{2 * sensor_period_ns / 1e6:.1f} ms)",)
    if source != "samples":
        reasons = (_SOURCE_CAVEAT[source],) + reasons
    if sensor.response is None:
        reasons = reasons + (sensor.origin,)
    gap_s = float(np.sum(we.gaps_ns[:, 1] - we.gaps_ns[:, 0]) / 1e9) if len(we.gaps_ns) else 0.0
    return GpuEnergy(
        **common, source=source, energy_j=we.energy_j, mean_power_w=we.mean_power_w, peak_power_w=we.peak_power_w,
        uncertainty_j=we.uncertainty_j, uncertainty_reasons=reasons, coverage=we.coverage, gaps=len(we.gaps_ns),
        gap_s=gap_s, sample_period_s=(period_ns / 1e9) if period_ns else None, n_samples=we.n_samples,
        sensor_shift_ns=shift_ns, errors=errors, t_ns=t_ns, power_w=power_w,
    )


def _combine(name: str | None, start_ns: int, stop_ns: int, gpus: tuple[GpuEnergy, ...],
             errors: tuple[str, ...]) -> Measurement:
    duration_s = (stop_ns - start_ns) / 1e9
    energy_j = float(sum(g.energy_j for g in gpus))
    counters = [g.counter_energy_j for g in gpus]
    reasons = tuple(f"cuda:{g.cuda_index}: {r}" if len(gpus) > 1 else r for g in gpus for r in g.uncertainty_reasons)
    return Measurement(
        name=name, start_ns=start_ns, stop_ns=stop_ns, duration_s=duration_s, energy_j=energy_j,
        mean_power_w=energy_j / duration_s if duration_s > 0 else math.nan,
        peak_power_w=max((g.peak_power_w for g in gpus if not math.isnan(g.peak_power_w)), default=math.nan),
        uncertainty_j=float(math.sqrt(sum(g.uncertainty_j**2 for g in gpus))),
        uncertainty_reasons=reasons, coverage=float(min((g.coverage for g in gpus), default=0.0)),
        gaps=sum(g.gaps for g in gpus),
        counter_energy_j=float(sum(c for c in counters if c is not None)) if all(c is not None for c in counters)
        else None,
        gpus=gpus, errors=errors,
    )
