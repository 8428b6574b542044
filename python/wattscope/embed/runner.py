"""Run a command while measuring the GPUs (and the CPU through RAPL): the engine of `wattscope run`.

The window opens before the child is spawned and closes when it has exited, so it holds the child's whole life:
interpreter start-up, imports and CUDA initialisation included. The energy is whole-device: every process using the
measured GPUs during the window counts, not only the child.

Signals: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to this process are forwarded to the child,
and the measurement is still taken when it exits. A terminal's Ctrl-C (SIGINT) or Ctrl-\\ (SIGQUIT) already reaches
the child, which shares the terminal's foreground process group, so those two are not forwarded a second time when
this process is in the foreground (nor is a SIGINT or SIGQUIT sent with kill(1) then: a handler cannot tell the two
apart). Only signals actually sent to the child are listed in ``signals_forwarded``. The handlers are in place from
before the child is spawned until the run's results are ready (``SignalForwarder``); a signal that arrives while no
child runs is held in ``SignalForwarder.pending``, and ``run_command`` delivers it again once it has restored the
previous handlers. Forwarding needs the main thread (Python signal handlers live there); from other threads the
command runs without it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _session, kernel_session
from ..devices import DeviceSelector
from ..errors import MeasurementError, WattscopeError
from ..measurement import Measurement
from ..meter import PowerMeter
from ..rapl import POWERCAP_ROOT, CpuEnergy, RaplMeter
from . import windows
from .child_tracing import ChildTracing

FORWARDED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
_TERMINAL_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGQUIT") if hasattr(signal, n)}


class CommandStartError(MeasurementError):
    """The command could not be started (nothing ran). ``exit_code`` is a shell's: 127 not found, 126 not
    executable."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class KernelReport:
    """Energy per kernel of each measured GPU (``rows``: kernel name -> wattscope.kernels.KernelEnergy rows), or
    only ``notes`` when nothing could be traced or attributed."""

    rows: dict[str, tuple[Any, ...]]  # "cuda:0" -> rows, largest energy first, [idle]/[unattributed] included
    methods: dict[str, str]
    processes: int
    notes: tuple[str, ...]


@dataclass(frozen=True)
class RunResult:
    """One run of a command. ``exit_code`` follows the shell: the child's status, or 128 + N if signal N ended it."""

    command: tuple[str, ...]
    exit_code: int
    measurement: Measurement
    cpu: CpuEnergy | None
    intervals: tuple[windows.SubWindow, ...]
    kernels: KernelReport | None
    signals_forwarded: tuple[str, ...]

    def to_trial(self) -> dict[str, object]:
        """The flat trial of a results file: the Measurement's keys, the CPU's (``cpu.*``) and ``exit_code``."""
        out = self.measurement.to_dict()
        if self.cpu is not None:
            out.update(self.cpu.to_dict())
        out["exit_code"] = self.exit_code
        return out


def run_command(
    command: Sequence[str],
    *,
    devices: DeviceSelector = None,
    name: str | None = None,
    kernels: bool = False,
    interval_s: float | None = None,
    cpu: bool = True,
    rapl_root: str | Path = POWERCAP_ROOT,
    env: dict[str, str] | None = None,
    signals: SignalForwarder | None = None,
) -> RunResult:
    """Run ``command`` (no shell) to completion while measuring ``devices`` (default: every GPU visible to CUDA).

    kernels: trace the kernels of the Python processes under the command (child_tracing.py) and attribute them.
    interval_s: also split the window into intervals of this length. cpu: read RAPL (``rapl_root``) beside the GPUs.
    signals: an entered SignalForwarder that outlives this call (`wattscope run --repeat` keeps one for all trials
    and reads its ``pending``); without one, a forwarder is installed for this call only, and a signal that came
    while no child ran is raised again after the previous handlers are back.
    Raises CommandStartError (nothing was run) and the meter's errors (no NVML, a bad device) before the child
    starts; a measurement that fails after the child ran raises with the child's ``child_exit_code`` attached.
    """
    command = tuple(str(c) for c in command)
    if not command:
        raise ValueError("no command to run: give it after `--`, e.g. wattscope run -- python train.py")
    if interval_s is not None and not (interval_s > 0):
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
    options = dict(devices=devices, name=name, kernels=kernels, interval_s=interval_s, cpu=cpu, rapl_root=rapl_root,
                   env=env)
    if signals is not None:
        return _run_once(command, signals, **options)  # type: ignore[arg-type]
    with SignalForwarder() as own:
        result = _run_once(command, own, **options)  # type: ignore[arg-type]
    if own.pending is not None:
        signal.raise_signal(own.pending)
    return result


def _run_once(command: tuple[str, ...], signals: SignalForwarder, *, devices: DeviceSelector, name: str | None,
              kernels: bool, interval_s: float | None, cpu: bool, rapl_root: str | Path,
              env: dict[str, str] | None) -> RunResult:
    meter = PowerMeter(devices, name=name or shlex.join(command), sync_cuda=False)
    tracing = ChildTracing() if kernels else None
    child_env = dict(os.environ if env is None else env)
    if tracing is not None:
        child_env = tracing.environment(child_env)
    rapl = RaplMeter(rapl_root) if cpu else None
    first_forwarded = len(signals.forwarded)
    try:
        meter.start()
        if rapl is not None:
            rapl.start()
        try:
            child = subprocess.Popen(command, env=child_env)
        except OSError as e:
            meter.stop()
            if rapl is not None:
                rapl.stop()
            # A shell's statuses: 127 when there is no such program, 126 when it exists but cannot be executed
            # (no permission, a directory, a script without a #! line: ENOEXEC).
            if isinstance(e, (FileNotFoundError, NotADirectoryError)):
                raise CommandStartError(f"{command[0]}: command not found", 127) from e
            raise CommandStartError(f"{command[0]}: cannot execute: {e.strerror or e}", 126) from e
        signals.attach(child)
        try:
            status = child.wait()
        finally:
            signals.detach()
        exit_code = status if status >= 0 else 128 - status
        meter.stop()
        if rapl is not None:
            rapl.stop()
        try:
            m = meter.result
            parts = tuple(windows.intervals(m, interval_s)) if interval_s is not None else ()
        except WattscopeError as e:
            e.child_exit_code = exit_code  # type: ignore[attr-defined]
            raise
        report = _kernel_report(tracing, m) if tracing is not None else None
    finally:
        if tracing is not None:
            tracing.close()
    return RunResult(command, exit_code, m, rapl.result if rapl is not None else None, parts, report,
                     tuple(signals.forwarded[first_forwarded:]))


class SignalForwarder:
    """While entered (main thread only), FORWARDED_SIGNALS go to the attached child; one that arrives while no child
    runs is kept in ``pending`` (the latest) instead of ending this process, so finished trials are not lost.
    ``forwarded`` lists the names of the signals actually sent."""

    def __init__(self) -> None:
        self.forwarded: list[str] = []
        self.pending: int | None = None
        self._child: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
        if threading.current_thread() is threading.main_thread():
            for sig in FORWARDED_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def attach(self, child: subprocess.Popen) -> None:
        self._child = child
        # A signal that came while the child was being started was meant for the run: the child takes it now.
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self._send(signum)

    def detach(self) -> None:
        self._child = None

    def _handle(self, signum: int, frame: object) -> None:
        if self._child is None or self._child.poll() is not None:
            self.pending = signum
            return
        if signum in _TERMINAL_SIGNALS and _terminal_delivers_to_child():
            return
        self._send(signum)

    def _send(self, signum: int) -> None:
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signum)
            self.forwarded.append(signal.Signals(signum).name)


def _terminal_delivers_to_child() -> bool:
    """True when this process is in its terminal's foreground process group: a key-generated signal went to the
    whole group, the child (spawned into it) included."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _kernel_report(tracing: ChildTracing, m: Measurement) -> KernelReport:
    """The kernel report, or, when building it fails (unreadable or malformed child records), only a note saying
    why: the energy and the child's exit status are kept either way."""
    try:
        return _attribute_kernels(tracing, m)
    except Exception as e:  # any failure here must not cost the measurement
        return KernelReport({}, {}, 0, (f"the kernel report failed ({type(e).__name__}: {e}); energy only",))


def _attribute_kernels(tracing: ChildTracing, m: Measurement) -> KernelReport:
    by_uuid = {g.uuid.lower(): g.cuda_index for g in m.gpus if g.cuda_index is not None}
    found = tracing.collect(by_uuid)
    notes = list(found.notes)
    rows: dict[str, tuple[Any, ...]] = {}
    methods: dict[str, str] = {}
    if found.capture is not None:
        driver = _session.current().driver_version()
        for g in m.gpus:
            key = f"cuda:{g.cuda_index}"
            try:
                att = kernel_session.attribute_gpu(found.capture, g, m.start_ns, m.stop_ns, driver, None, "name")
            except (MeasurementError, ValueError) as e:
                notes.append(f"{key}: {e}")
                continue
            rows[key] = att.rows
            methods[key] = att.method
            notes += [f"{key}: {n}" for n in att.notes]
    return KernelReport(rows, methods, found.processes, tuple(notes))
