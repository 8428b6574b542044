"""Peer energy meters that the benchmarks run side by side with wattscope.

Each peer measures one GPU, named by its **NVML index**, and has the same small
interface::

    peer.begin()            # mark the start of a window
    joules = peer.end()     # energy in J over the window since begin()
    peer.close()            # release threads / NVML

Peers:

* :class:`PynvmlPoller` -- what users commonly write themselves: a Python
  ``threading.Thread`` that polls an NVML power reading every ``interval_s``
  and integrates it trapezoidally between ``begin()`` and ``end()``.
* :class:`ZeusWindow` -- Zeus's ``ZeusMonitor`` (``zeus`` 0.16.0), which on
  Volta and newer GPUs reads NVML's cumulative **energy counter**
  (``nvmlDeviceGetTotalEnergyConsumption``, ~4 ms per call on H100) once at
  each window edge and returns the difference.

pynvml and zeus are imported inside ``__init__`` only, so importing this module
never fails on a machine that lacks them (or lacks a GPU). On the GPU host they
come from the wheels listed in ``bench/wheels.txt``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time

__all__ = ["PynvmlPoller", "ZeusWindow"]


class PynvmlPoller:
    """Energy from a Python thread that polls NVML power (the "do it yourself" approach).

    What it measures: the integral over ``[begin, end]`` of the power samples a
    Python thread reads from NVML every ``interval_s`` seconds, using the trapezoid
    rule on host timestamps (``time.monotonic``, taken right after each read
    returns). The reading is one of:

    * ``field="instant"``: field ``NVML_FI_DEV_POWER_INSTANT`` (186) through
      ``nvmlDeviceGetFieldValues``. On H100 this value changes only every ~100 ms
      and reflects a ~25 ms averaging window (see shared/docs/measurement-facts.md).
    * ``field="usage"``: ``nvmlDeviceGetPowerUsage``, which on Ampere (except
      GA100) and newer, H100 included, is a **1 s moving average** -- it lags
      and smears short windows.

    Polling faster than the sensor updates only re-reads the same value; the
    defaults (10 ms) are the kind of figure users pick.

    The thread starts in ``__init__`` and runs until ``close()``; ``begin()`` and
    ``end()`` only take a timestamp (plus, in ``end()``, a pass over the samples
    collected since ``begin()``), so their host cost is small, while the thread
    competes for the GIL all the time. One window at a time.

    Window edges: the power at ``begin`` is interpolated linearly between the
    samples around it (or the nearest sample); the power at ``end`` is the last
    sample taken before ``end`` (held constant; ``end()`` does not wait for the next
    poll). A window shorter than one poll thus reads ``P_last * duration``.
    """

    def __init__(self, index: int, interval_s: float = 0.01, field: str = "instant") -> None:
        import pynvml  # lazy: this module must import without pynvml

        if field not in ("instant", "usage"):
            raise ValueError(f"field must be 'instant' or 'usage', not {field!r}")
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self._nvml = pynvml
        self.index = int(index)
        self.interval_s = float(interval_s)
        self.field = field

        pynvml.nvmlInit()  # reference counted; close() calls nvmlShutdown()
        self._closed = False
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self._read_mw = self._make_reader()
            self._read_mw()  # fail here, not in the thread, if the field is unsupported
        except BaseException:
            pynvml.nvmlShutdown()
            self._closed = True
            raise

        self._lock = threading.Lock()
        self._times: list[float] = []   # time.monotonic() s, after each read
        self._watts: list[float] = []
        self._t_begin: float | None = None
        self._error: BaseException | None = None
        self.missed_ticks = 0           # polls skipped because the loop fell behind
        self.n_samples = 0              # samples used by the last end()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"PynvmlPoller[{self.index}]", daemon=True
        )
        self._thread.start()

    # -- sampling -----------------------------------------------------------
    def _make_reader(self):
        nv = self._nvml
        handle = self._handle
        if self.field == "usage":
            def read_mw() -> float:
                return float(nv.nvmlDeviceGetPowerUsage(handle))
        else:
            fid = nv.NVML_FI_DEV_POWER_INSTANT

            def read_mw() -> float:
                v = nv.nvmlDeviceGetFieldValues(handle, [fid])[0]
                if v.nvmlReturn != nv.NVML_SUCCESS:
                    raise nv.NVMLError(v.nvmlReturn)
                return float(v.value.uiVal)
        return read_mw

    def _run(self) -> None:
        read_mw = self._read_mw
        period = self.interval_s
        stop = self._stop
        deadline = time.monotonic()
        try:
            while not stop.is_set():
                w = read_mw() / 1000.0
                t = time.monotonic()
                with self._lock:
                    self._times.append(t)
                    self._watts.append(w)
                    if self._t_begin is None and len(self._times) > 64:
                        # no window open: keep only the newest two samples
                        del self._times[:-2]
                        del self._watts[:-2]
                deadline += period
                now = time.monotonic()
                if now > deadline:  # fell behind: skip the missed ticks
                    skipped = int((now - deadline) // period) + 1
                    self.missed_ticks += skipped
                    deadline += skipped * period
                stop.wait(max(0.0, deadline - time.monotonic()))
        except BaseException as e:  # never die silently: end() re-raises it
            self._error = e

    # -- window ---------------------------------------------------------------
    def begin(self) -> None:
        """Mark the start of a window (takes a timestamp; drops older samples)."""
        self._check()
        t0 = time.monotonic()
        with self._lock:
            # keep the last sample before t0 for interpolation at the edge
            k = 0
            for i in range(len(self._times) - 1, -1, -1):
                if self._times[i] <= t0:
                    k = i
                    break
            del self._times[:k]
            del self._watts[:k]
            self._t_begin = t0

    def end(self) -> float:
        """Close the window and return the energy in J since ``begin()``."""
        t1 = time.monotonic()
        self._check()
        with self._lock:
            t0 = self._t_begin
            if t0 is None:
                raise RuntimeError("end() without begin()")
            self._t_begin = None
            ts = list(self._times)
            ws = list(self._watts)
        return self._integrate(ts, ws, t0, t1)

    def _integrate(self, ts: list[float], ws: list[float], t0: float, t1: float) -> float:
        if t1 <= t0 or not ts:
            self.n_samples = 0
            return 0.0
        # power at t0: linear interpolation between the samples around t0
        before = [i for i, t in enumerate(ts) if t <= t0]
        after = [i for i, t in enumerate(ts) if t0 < t < t1]
        if before and after:
            i, j = before[-1], after[0]
            a = (t0 - ts[i]) / (ts[j] - ts[i])
            p0 = ws[i] + a * (ws[j] - ws[i])
        elif before:
            p0 = ws[before[-1]]
        else:
            p0 = ws[after[0]] if after else ws[0]
        pts_t = [t0] + [ts[k] for k in after]
        pts_w = [p0] + [ws[k] for k in after]
        # power at t1: last sample before t1 (zero-order hold), no waiting
        pts_t.append(t1)
        pts_w.append(pts_w[-1])
        self.n_samples = len(after)
        e = 0.0
        for k in range(1, len(pts_t)):
            e += 0.5 * (pts_w[k] + pts_w[k - 1]) * (pts_t[k] - pts_t[k - 1])
        return e

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("PynvmlPoller is closed")
        if self._error is not None:
            raise RuntimeError("PynvmlPoller thread failed") from self._error

    def close(self) -> None:
        """Stop the polling thread and release NVML."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()

    def __enter__(self) -> PynvmlPoller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ZeusWindow:
    """Energy from Zeus's ``ZeusMonitor`` windows (zeus 0.16.0).

    What it measures: on Volta and newer GPUs (H100 included) ``begin_window`` and
    ``end_window`` each read NVML's cumulative energy counter once
    (``nvmlDeviceGetTotalEnergyConsumption``, mJ; ~4 ms per call on H100), and the
    window's energy is the difference of the two readings. No background
    sampling; resolution is the counter's update period (~100 ms on H100): a
    shorter window can read 0 J (Zeus then warns, unless ``approx_instant_energy``
    is on, in which case it substitutes instant power x duration). The counter
    accumulates the same sampled power signal as NVML's power readings, so it is
    not an independent reference.

    Choices made here (zeus 0.16.0 API):

    * ``ZeusMonitor(gpu_indices=[i], cpu_indices=[], approx_instant_energy=...,
      sync_execution_with="torch")``. The constructor can only *choose* the
      framework used for syncing (``"torch" | "jax" | "cupy"``, no "off"); syncing
      is switched off per call instead, with ``begin_window(key,
      sync_execution=False)`` and ``end_window(key, sync_execution=False)``, so the
      benchmark sees Zeus's host overhead only (no ``torch.cuda.synchronize``;
      Zeus then never imports torch). Pass ``sync=True`` to get Zeus's default.
    * ``cpu_indices=[]``: GPU only. Otherwise, where RAPL is readable (root),
      every window edge also reads the RAPL files, and the first read spawns a
      wraparound-tracking process per RAPL file.
    * Index: Zeus indexes GPUs by position in ``CUDA_VISIBLE_DEVICES`` (NVML
      order when unset); this class takes an NVML index and maps it.
    * Result: ``end_window`` returns ``Measurement(time, gpu_energy: dict[int,
      float] (J), cpu_energy, dram_energy, soc_energy)``; we return
      ``.total_energy`` (sum of ``gpu_energy``, J), and keep the full
      ``Measurement`` in ``self.last``.
    """

    _ids = itertools.count()

    def __init__(self, index: int, sync: bool = False, approx_instant_energy: bool = False) -> None:
        from zeus.monitor import ZeusMonitor  # lazy: this module must import without zeus

        self.index = int(index)
        self.sync = bool(sync)
        self._zeus_index = self._nvml_to_zeus_index(self.index)
        self.monitor = ZeusMonitor(
            gpu_indices=[self._zeus_index],
            cpu_indices=[],
            approx_instant_energy=approx_instant_energy,
            sync_execution_with="torch",  # used only when sync=True
        )
        self._key = f"wattscope-bench-{next(self._ids)}"
        self.last = None  # the last zeus Measurement

    @staticmethod
    def _nvml_to_zeus_index(nvml_index: int) -> int:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        if cvd is None:
            return nvml_index
        try:
            visible = [int(x) for x in cvd.split(",")]
        except ValueError:
            raise ValueError(
                f"CUDA_VISIBLE_DEVICES={cvd!r}: Zeus accepts integer indices only"
            ) from None
        if nvml_index not in visible:
            raise ValueError(f"NVML index {nvml_index} not in CUDA_VISIBLE_DEVICES={cvd!r}")
        return visible.index(nvml_index)

    def begin(self) -> None:
        """``begin_window``: one energy-counter read (~4 ms on H100)."""
        self.monitor.begin_window(self._key, sync_execution=self.sync, restart=True)

    def end(self) -> float:
        """``end_window``: one energy-counter read; returns the window's energy in J."""
        m = self.monitor.end_window(self._key, sync_execution=self.sync)
        self.last = m
        return float(m.total_energy)

    def close(self) -> None:
        """Nothing to stop (Zeus keeps no thread for Volta+ GPUs); drops an open window."""
        self.monitor.measurement_states.pop(self._key, None)

    def __enter__(self) -> ZeusWindow:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
