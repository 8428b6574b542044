"""CPU energy from RAPL through Linux powercap (``/sys/class/powercap/intel-rapl:*``), beside the GPUs' energy.

Each RAPL zone exposes ``name`` (``package-N`` for a socket, ``dram``/``core``/``uncore`` for its sub-zones, ``psys``
for the platform), a cumulative ``energy_uj`` counter and its ``max_energy_range_uj``. Only the package and DRAM
domains are summed: on servers DRAM is outside the package, core/uncore are inside it, and psys spans both.

The counter wraps to 0 after ``max_energy_range_uj`` (a few minutes at full power on some CPUs): a window is the sum
of the deltas between reads, each read at most one wrap after the previous one, so :class:`RaplMeter` reads on a
background thread every ``poll_period_s``. RAPL counts the whole socket (every process) and is not readable
everywhere: since the fix for CVE-2020-8694 (PLATYPUS, November 2020) ``energy_uj`` is readable by root only; ARM
machines, most VMs and many containers expose no zones. The result then says why instead of raising.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import MeasurementError

POWERCAP_ROOT = Path("/sys/class/powercap")
_ZONE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
_KEPT = ("package", "dram")


def _permission_advice(root: Path) -> str:
    return ("since the fix for CVE-2020-8694 (PLATYPUS) only root may read RAPL energy: run as root, or grant read "
            f"access until the next reboot with `sudo chmod o+r {root}/intel-rapl:*/energy_uj`")


@dataclass(frozen=True)
class RaplDomain:
    """One RAPL counter: ``name`` is ``package-N`` or ``dram-N`` (N the socket), ``zone`` its powercap directory."""

    name: str
    zone: Path
    max_energy_range_uj: int


@dataclass(frozen=True)
class RaplDomainEnergy:
    name: str
    zone: str
    energy_j: float
    wraps: int  # counter wrap-arounds seen inside the window


@dataclass(frozen=True)
class CpuEnergy:
    """CPU energy over a window, whole socket (every process on it counts).

    ``energy_j`` sums the package and DRAM domains; nan with ``available`` False, and ``reason`` saying why, when
    RAPL cannot be read. ``reason`` also lists domains that could not be read while others could.
    """

    available: bool
    reason: str | None
    energy_j: float
    duration_s: float
    domains: tuple[RaplDomainEnergy, ...]

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else math.nan

    def to_dict(self) -> dict[str, object]:
        """Flat, unit-bearing keys: ``cpu.energy_j``, ``cpu.package-0.energy_j``, ..., ``cpu.reason``."""
        out: dict[str, object] = {"cpu.energy_j": self.energy_j, "cpu.mean_power_w": self.mean_power_w}
        for d in self.domains:
            out[f"cpu.{d.name}.energy_j"] = d.energy_j
        out["cpu.reason"] = self.reason
        return out

    def __str__(self) -> str:
        if not self.available:
            return f"CPU (RAPL): unavailable: {self.reason}"
        parts = ", ".join(f"{d.name} {d.energy_j:.3f} J" for d in self.domains)
        note = f" ({self.reason})" if self.reason else ""
        return f"CPU (RAPL, whole socket): {self.energy_j:.3f} J, mean {self.mean_power_w:.1f} W [{parts}]{note}"


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def discover(root: str | Path = POWERCAP_ROOT) -> tuple[list[RaplDomain], str | None]:
    """The package and DRAM domains under ``root``, and why there are none (None when some were found)."""
    root = Path(root)
    if not root.is_dir():
        return [], f"{root} does not exist: no powercap interface (not Linux, or sysfs is not mounted)"
    try:
        entries = list(root.iterdir())
    except OSError as e:
        return [], f"cannot list {root}: {e.strerror or e}"
    zones = {}
    for path in entries:
        match = _ZONE.match(path.name)
        if match:
            zones[path.name] = (path, match)
    if not zones:
        return [], (f"no RAPL zones (intel-rapl:*) under {root}: this CPU or kernel does not expose RAPL (usual on "
                    "ARM, in VMs and in many containers)")
    domains = []
    problems = []
    for zone_name in sorted(zones, key=lambda z: tuple(int(x) for x in re.findall(r"\d+", z))):
        path, match = zones[zone_name]
        try:
            name = (path / "name").read_text().strip()
            max_uj = _read_int(path / "max_energy_range_uj")
        except (OSError, ValueError) as e:
            problems.append(f"{zone_name}: {e}")
            continue
        kind = name.split("-")[0]
        if kind not in _KEPT:
            continue
        socket = match.group(1)
        label = name if match.group(2) is None and "-" in name else f"{kind}-{socket}"
        domains.append(RaplDomain(label, path, max_uj))
    if not domains:
        detail = f" ({'; '.join(problems)})" if problems else ""
        return [], f"no package or DRAM domain among the RAPL zones under {root}{detail}"
    return domains, None


class RaplMeter:
    """Measure CPU package and DRAM energy over a window: ``with RaplMeter() as r: ...; r.result``.

    root: the powercap directory (tests pass a fake tree). poll_period_s: how often the background thread reads the
    counters so that no wrap-around is missed (None: no thread; call ``poll()`` yourself at least once per wrap
    period, ``max_energy_range_uj`` / package power). Never raises for an unreadable RAPL: ``result.reason`` says why.
    """

    def __init__(self, root: str | Path = POWERCAP_ROOT, *, poll_period_s: float | None = 10.0) -> None:
        if poll_period_s is not None and not (poll_period_s > 0 and math.isfinite(poll_period_s)):
            raise ValueError(f"poll_period_s must be a positive number of seconds or None, got {poll_period_s!r}")
        self.root = Path(root)
        self.poll_period_s = poll_period_s
        self._lock = threading.Lock()
        self._domains: list[RaplDomain] = []
        self._last_uj: list[int] = []
        self._total_uj: list[int] = []
        self._wraps: list[int] = []
        self._reason: str | None = None
        self._start_ns: int | None = None
        self._stop_ns: int | None = None
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RaplMeter:
        """Open the window (again, after a stop: a new window). Raises MeasurementError if it is already open."""
        if self._start_ns is not None and self._stop_ns is None:
            raise MeasurementError("RaplMeter.start() called twice without stop(); use one meter per window")
        domains, reason = discover(self.root)
        readable, last, problems = [], [], []
        for d in domains:
            try:
                last.append(_read_int(d.zone / "energy_uj"))
                readable.append(d)
            except PermissionError:
                problems.append(f"{d.zone}/energy_uj is not readable: {_permission_advice(self.root)}")
            except (OSError, ValueError) as e:
                problems.append(f"{d.zone}/energy_uj: {e}")
        with self._lock:
            self._domains, self._last_uj = readable, last
            self._total_uj = [0] * len(readable)
            self._wraps = [0] * len(readable)
            self._reason = "; ".join(([reason] if reason else []) + problems) or None
            self._start_ns, self._stop_ns = time.monotonic_ns(), None
        self._stop_event.clear()
        if readable and self.poll_period_s is not None:
            self._thread = threading.Thread(target=self._poll_loop, name="wattscope-rapl", daemon=True)
            self._thread.start()
        return self

    def poll(self) -> None:
        """Read every counter now and add what it gained since the last read (one wrap-around at most)."""
        with self._lock:
            for i, d in enumerate(self._domains):
                try:
                    now_uj = _read_int(d.zone / "energy_uj")
                except (OSError, ValueError):
                    continue  # a transient failure: the next read covers the interval
                delta = now_uj - self._last_uj[i]
                if delta < 0:
                    # The counter wraps at max_energy_range_uj plus one hardware energy unit (tens of uJ); adding
                    # 1 uJ instead is off by less than one unit per wrap, far below the counter's own resolution.
                    delta += d.max_energy_range_uj + 1
                    self._wraps[i] += 1
                self._total_uj[i] += delta
                self._last_uj[i] = now_uj

    def stop(self) -> RaplMeter:
        if self._start_ns is None or self._stop_ns is not None:
            raise MeasurementError("RaplMeter.stop() called without a matching start()")
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll()
        self._stop_ns = time.monotonic_ns()
        return self

    def __enter__(self) -> RaplMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def result(self) -> CpuEnergy:
        if self._start_ns is None or self._stop_ns is None:
            raise MeasurementError(
                "RaplMeter.result: the window is not closed yet (use the with-block or start()/stop())"
            )
        duration_s = (self._stop_ns - self._start_ns) / 1e9
        with self._lock:
            domains = tuple(RaplDomainEnergy(d.name, str(d.zone), total / 1e6, wraps)
                            for d, total, wraps in zip(self._domains, self._total_uj, self._wraps, strict=True))
            reason = self._reason
        energy_j = sum(d.energy_j for d in domains) if domains else math.nan
        return CpuEnergy(bool(domains), reason, energy_j, duration_s, domains)

    def _poll_loop(self) -> None:
        assert self.poll_period_s is not None
        while not self._stop_event.wait(self.poll_period_s):
            self.poll()
