"""Results as data: frozen dataclasses whose field names carry their units."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .files import write_atomic


@dataclass(frozen=True)
class GpuEnergy:
    """Energy of one GPU over a measurement window.

    ``t_ns``/``power_w`` are the raw readings of ``source`` stamped in the window plus two on each side (a reading
    covers the interval since the previous one, so the edge readings reach into the window).
    """

    cuda_index: int | None
    nvml_index: int
    name: str
    uuid: str
    source: str  # "samples" (buffered ~20 ms stream), "instant", "average" or "energy_counter"
    energy_j: float
    mean_power_w: float
    peak_power_w: float
    uncertainty_j: float
    uncertainty_reasons: tuple[str, ...]
    coverage: float  # share of the window the readings account for, 0..1
    gaps: int  # holes in the readings inside the window
    gap_s: float
    counter_energy_j: float | None  # energy-counter delta over the window: a bookkeeping cross-check
    sample_period_s: float | None
    n_samples: int
    sensor_model: str  # which sensor response aligned the readings and sized the uncertainty, and where it came from
    sensor_profile: str | None  # path of the calibration profile used; None when built-in defaults were used
    sensor_shift_ns: int  # the energy used stamps t_ns - sensor_shift_ns (the sensor's measured lag, see sensor.py)
    sm_clock_mhz_mean: float | None
    temperature_c_max: float | None
    errors: tuple[str, ...]
    t_ns: np.ndarray = field(repr=False, compare=False)
    power_w: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class GpuTrace:
    """Every reading one GPU's sources gave around a window: the raw material for plots and calibration.

    ``series`` maps a source to ``(t_ns, value)`` numpy arrays, stamped on CLOCK_MONOTONIC: ``samples``,
    ``instant`` and ``average`` in W, ``energy_counter`` in J (cumulative since the driver loaded), ``sm_clock`` in
    MHz, ``temperature`` in °C. A source the GPU does not offer is absent. Each series reaches a few readings
    beyond both edges of the window.
    """

    cuda_index: int | None
    nvml_index: int
    name: str
    uuid: str
    driver_version: str
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Measurement:
    """Energy of every measured GPU over [start_ns, stop_ns] (CLOCK_MONOTONIC).

    ``peak_power_w`` is the highest single-GPU reading; ``coverage`` the lowest of the GPUs'; ``uncertainty_j`` the
    GPUs' uncertainties added in quadrature (their errors are independent).
    """

    name: str | None
    start_ns: int
    stop_ns: int
    duration_s: float
    energy_j: float
    mean_power_w: float
    peak_power_w: float
    uncertainty_j: float
    uncertainty_reasons: tuple[str, ...]
    coverage: float
    gaps: int
    counter_energy_j: float | None
    gpus: tuple[GpuEnergy, ...]
    errors: tuple[str, ...]

    def gpu(self, cuda_index: int) -> GpuEnergy:
        """The per-GPU result for a CUDA index."""
        for g in self.gpus:
            if g.cuda_index == cuda_index:
                return g
        raise KeyError(f"GPU cuda:{cuda_index} was not measured; measured: {[g.cuda_index for g in self.gpus]}")

    def to_dict(self) -> dict[str, object]:
        """Flat, unit-bearing keys (``gpu0.energy_j``), for JSON/CSV exports and harnesses."""
        out: dict[str, object] = {
            "name": self.name,
            "start_ns": self.start_ns,
            "stop_ns": self.stop_ns,
            "duration_s": self.duration_s,
            "energy_j": self.energy_j,
            "mean_power_w": self.mean_power_w,
            "peak_power_w": self.peak_power_w,
            "uncertainty_j": self.uncertainty_j,
            "coverage": self.coverage,
            "gaps": self.gaps,
            "counter_energy_j": self.counter_energy_j,
        }
        for g in self.gpus:
            key = gpu_key(g)
            for name in ("energy_j", "mean_power_w", "peak_power_w", "uncertainty_j", "coverage", "gaps", "source",
                         "counter_energy_j", "sample_period_s", "n_samples", "uuid", "name"):
                out[f"{key}.{name}"] = getattr(g, name)
        return out

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """``to_dict()`` plus the ``uncertainty_reasons`` and ``errors`` lists as JSON (NaN written as null); also
        written to ``path`` when given."""
        doc = {**self.to_dict(), "uncertainty_reasons": list(self.uncertainty_reasons), "errors": list(self.errors)}
        text = json.dumps(json_safe(doc), indent=indent)
        if path is not None:
            write_atomic(path, text + "\n")
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """``to_dict()`` as a CSV header and one row; also written to ``path`` when given."""
        text = rows_to_csv([self.to_dict()])
        if path is not None:
            write_atomic(path, text)
        return text

    def __str__(self) -> str:
        lines = [
            f"{self.name or 'measurement'}: {self.energy_j:.3f} J ± {self.uncertainty_j:.3f} J over "
            f"{self.duration_s * 1e3:.1f} ms (mean {self.mean_power_w:.1f} W, peak {self.peak_power_w:.1f} W, "
            f"coverage {self.coverage:.0%})"
        ]
        for g in self.gpus:
            counter = f", counter {g.counter_energy_j:.3f} J" if g.counter_energy_j is not None else ""
            lines.append(
                f"  cuda:{g.cuda_index} {g.name}: {g.energy_j:.3f} J ± {g.uncertainty_j:.3f} J "
                f"[{g.source}, {g.n_samples} samples{counter}]"
            )
        lines += [f"  ! {e}" for e in self.errors]
        return "\n".join(lines)


def gpu_key(g: GpuEnergy) -> str:
    """The prefix of one GPU's flat keys: ``gpu0`` for CUDA index 0, ``gpunvml3`` for a GPU CUDA does not show."""
    return f"gpu{g.cuda_index if g.cuda_index is not None else 'nvml' + str(g.nvml_index)}"


def to_frame(measurements: Iterable[Measurement]) -> Any:
    """One row per Measurement, its ``to_dict()`` keys as columns (a GPU measured by only some rows leaves the others
    empty), as a pandas DataFrame."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_frame needs pandas: pip install 'wattscope[pandas]'") from None
    return pd.DataFrame([m.to_dict() for m in measurements])


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN and infinities (a fallback source has no peak power) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def rows_to_csv(rows: list[dict[str, object]]) -> str:
    """Rows as CSV with the union of their keys as the header, in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()
