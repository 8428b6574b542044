"""`wattscope doctor`: what this machine offers — versions, driver, each GPU, which power sources work and how
often they deliver — measured, not assumed."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import _session
from .devices import all_gpus
from .errors import NVML_PATH_ENV, WattscopeError
from .meter import SOURCES, PowerMeter


@dataclass(frozen=True)
class SourceReport:
    name: str
    supported: bool
    readings_per_s: float | None  # how often the sampler got a reading
    updates_per_s: float | None  # how often the value actually changed (the field may repeat itself)
    median_spacing_ms: float | None
    mean_power_w: float | None


@dataclass(frozen=True)
class GpuReport:
    cuda_index: int | None
    nvml_index: int
    name: str
    uuid: str
    pci_bus_id: str
    power_limit_w: float | None
    sources: list[SourceReport]
    gaps: int
    energy_j: float
    counter_energy_j: float | None


@dataclass(frozen=True)
class DoctorReport:
    versions: dict[str, str]
    nvml_path: str
    driver_version: str
    gpus: list[GpuReport] = field(default_factory=list)
    sampler_cpu_percent: float | None = None
    problem: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("wattscope", "numpy", "torch", "pandas"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def diagnose(seconds: float = 2.0) -> DoctorReport:
    """Load NVML, and sample every GPU for ``seconds`` to see which sources deliver and at what rate."""
    versions = _versions()
    path = os.environ.get(NVML_PATH_ENV, "") or "libnvidia-ml.so.1 (loader search path)"
    try:
        nvml = _session.current().nvml()
        versions["nvml"] = nvml.nvml_version()
        driver = nvml.driver_version()
        gpus = all_gpus(nvml)
    except WattscopeError as e:
        return DoctorReport(versions=versions, nvml_path=path, driver_version="", problem=str(e))
    if not gpus:
        return DoctorReport(versions=versions, nvml_path=path, driver_version=driver, problem="NVML sees no GPU")
    sampler = _session.current().sampler()
    cpu0 = sampler.stats()["thread_cpu_ns"]
    with PowerMeter("all", sync_cuda=False) as m:
        time.sleep(seconds)
    result = m.result
    cpu_ns = sampler.stats()["thread_cpu_ns"] - cpu0
    reports = []
    for gpu, g in zip(gpus, result.gpus, strict=True):
        snap = sampler.snapshot(_session.current().slot(gpu.nvml_index), result.start_ns, result.stop_ns)
        sources = [_source_report(name, snap[name], result.start_ns, result.stop_ns) for name in SOURCES]
        reports.append(GpuReport(
            cuda_index=gpu.cuda_index, nvml_index=gpu.nvml_index, name=gpu.name, uuid=gpu.uuid,
            pci_bus_id=gpu.pci_bus_id, power_limit_w=gpu.power_limit_w, sources=sources, gaps=g.gaps,
            energy_j=g.energy_j, counter_energy_j=g.counter_energy_j,
        ))
    return DoctorReport(versions=versions, nvml_path=nvml.path or path, driver_version=driver, gpus=reports,
                        sampler_cpu_percent=100.0 * cpu_ns / (result.duration_s * 1e9))


def _source_report(name: str, series: dict, start_ns: int, stop_ns: int) -> SourceReport:
    t, v = series["t_ns"], series["value"]
    inside = (t >= start_ns) & (t <= stop_ns)
    t, v = t[inside], v[inside]
    span_s = (stop_ns - start_ns) / 1e9
    if not series["supported"] or len(t) == 0:
        return SourceReport(name, bool(series["supported"]), None, None, None, None)
    changes = int(np.count_nonzero(np.diff(v))) if len(v) > 1 else 0
    mean_w = None
    if name == "energy_counter":
        if len(t) > 1:
            mean_w = float((v[-1] - v[0]) / 1000.0 / ((t[-1] - t[0]) / 1e9))
    else:
        mean_w = float(np.mean(v) / 1000.0)
    return SourceReport(
        name=name, supported=True, readings_per_s=len(t) / span_s, updates_per_s=changes / span_s,
        median_spacing_ms=float(np.median(np.diff(t)) / 1e6) if len(t) > 1 else None, mean_power_w=mean_w,
    )


def render(report: DoctorReport) -> str:
    lines = [f"wattscope {report.versions.get('wattscope')} on Python {report.versions['python']}"]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()
                                           if k not in ("python", "wattscope")))
    lines.append(f"NVML: {report.nvml_path}" + (f" (driver {report.driver_version})" if report.driver_version else ""))
    if report.problem:
        lines.append(f"PROBLEM: {report.problem}")
        return "\n".join(lines)
    for g in report.gpus:
        limit = f", limit {g.power_limit_w:.0f} W" if g.power_limit_w else ""
        lines.append(f"\ncuda:{g.cuda_index} nvml:{g.nvml_index}  {g.name}  {g.uuid}  {g.pci_bus_id}{limit}")
        lines.append(f"  {'source':<16}{'works':<7}{'readings/s':>11}{'updates/s':>11}{'spacing ms':>12}{'mean W':>9}")
        for s in g.sources:
            def fmt(x: float | None, spec: str) -> str:
                return format(x, spec) if x is not None else "-"
            lines.append(f"  {s.name:<16}{'yes' if s.supported else 'no':<7}{fmt(s.readings_per_s, '.1f'):>11}"
                         f"{fmt(s.updates_per_s, '.1f'):>11}{fmt(s.median_spacing_ms, '.1f'):>12}"
                         f"{fmt(s.mean_power_w, '.1f'):>9}")
        counter = f", energy counter {g.counter_energy_j:.2f} J" if g.counter_energy_j is not None else ""
        lines.append(f"  window energy {g.energy_j:.2f} J{counter}; gaps {g.gaps}")
    if report.sampler_cpu_percent is not None:
        lines.append(f"\nsampler thread CPU: {report.sampler_cpu_percent:.3f} % of one core")
    return "\n".join(lines)
