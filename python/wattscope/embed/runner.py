"""Run a command while measuring the GPUs (and the CPU through RAPL): the engine of `wattscope run`.

The window opens before the child is spawned and closes when it has exited, so it holds the child's whole life:
interpreter start-up, imports and CUDA initialisation included. The energy is whole-device: every process using the
measured GPUs during the window counts, not only the child.

Signals: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to this process are forwarded to the child,
and the measurement is still taken when it exits. A terminal's Ctrl-C (SIGINT) or Ctrl-\\ (SIGQUIT) already reaches
the child, which shares the terminal's foreground process group, so those two are not forwarded a second time when
this process is in the foreground. Forwarding needs the main thread (Python signal handlers live there); from other
threads the command runs without it.
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
) -> RunResult:
    """Run ``command`` (no shell) to completion while measuring ``devices`` (default: every GPU visible to CUDA).

    kernels: trace the kernels of the Python processes under the command (child_tracing.py) and attribute them.
    interval_s: also split the window into intervals of this length. cpu: read RAPL (``rapl_root``) beside the GPUs.
    Raises CommandStartError (nothing was run) and the meter's errors (no NVML, a bad device) before the child
    starts; a measurement that fails after the child ran raises with the child's ``child_exit_code`` attached.
    """
    command = tuple(str(c) for c in command)
    if not command:
        raise ValueError("no command to run: give it after `--`, e.g. wattscope run -- python train.py")
    if interval_s is not None and not (interval_s > 0):
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
    meter = PowerMeter(devices, name=name or shlex.join(command), sync_cuda=False)
    tracing = ChildTracing() if kernels else None
    child_env = dict(os.environ if env is None else env)
    if tracing is not None:
        child_env = tracing.environment(child_env)
    rapl = RaplMeter(rapl_root) if cpu else None
    forwarded: list[str] = []
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
        with _forwarding(child, forwarded):
            status = child.wait()
        exit_code = status if status >= 0 else 128 - status
        meter.stop()
        if rapl is not None:
            rapl.stop()
        try:
            m = meter.result
            parts = tuple(windows.intervals(m, interval_s)) if interval_s is not None else ()
            report = _kernel_report(tracing, m) if tracing is not None else None
        except WattscopeError as e:
            e.child_exit_code = exit_code  # type: ignore[attr-defined]
            raise
    finally:
        if tracing is not None:
            tracing.close()
    return RunResult(command, exit_code, m, rapl.result if rapl is not None else None, parts, report,
                     tuple(forwarded))


class _forwarding:
    """Forward signals to the child for the duration of the with-block (main thread only)."""

    def __init__(self, child: subprocess.Popen, log: list[str]) -> None:
        self.child = child
        self.log = log
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in FORWARDED_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._forward)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame: object) -> None:
        self.log.append(signal.Signals(signum).name)
        if signum in _TERMINAL_SIGNALS and _terminal_delivers_to_child():
            return
        if self.child.poll() is None:
            self.child.send_signal(signum)


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
