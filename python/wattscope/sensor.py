"""What wattscope knows about a GPU's power sensor: a calibration profile when one exists, else built-in defaults.

A sensor reading stamped at ``t`` reflects the power of some time before ``t``: the response's group delay (its
pure delay plus the centre of mass of its averaging, see wattscope.response). The energy estimator in energy.py
takes each reading as the mean power over the interval since the previous stamp, whose centre lies half a sample
period before the stamp. ``shift_ns`` moves the stamps back by the difference, so that each reading is credited to
the time whose power it reports: for a boxcar as wide as the sample period with no delay (the fake NVML, older
GPUs) the shift is 0.

Defaults: on H100 SXM with driver 580 the buffered sample stream behaves like a first-order low-pass filter
(measurement-facts §2), sampled every ~20 ms; `wattscope calibrate` measured its tau and delay there, and those are the
Hopper default. For other GPUs nothing is assumed and the measurement says so.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from .response import Response, stamp_shift_ns
from .sensor_profile import cache_dir, load_profile, profile_path


@dataclass(frozen=True)
class SensorModel:
    """The response of one power source of one GPU, as used to align readings and size the uncertainty."""

    response: Response | None  # None when the response has not been characterised
    origin: str  # where the figures came from, recorded in every Measurement
    profile_path: str | None  # the calibration profile, when one was used
    best_source: str | None  # the source the profile found best; None: wattscope's default order

    @property
    def memory_ns(self) -> int:
        """How far a power step's energy can spread over time in the readings (low-pass tau, half a boxcar)."""
        return int(self.response.memory_ns()) if self.response is not None else 0

    def shift_ns(self, sample_period_ns: float, *, polled: bool = False) -> int:
        """Move stamps back by this many ns before integrating readings spaced by ``sample_period_ns`` (see
        wattscope.response.stamp_shift_ns)."""
        return stamp_shift_ns(self.response, sample_period_ns, polled=polled)


# From `wattscope calibrate` on an H100 SXM, driver 580.159.04 (bench/RESULTS.md, calibration, 2026-11-24): two runs
# in a row gave tau 12.9 ± 0.3 ms and delay 3.86 ± 0.10 ms. Other Hopper boards are assumed alike until calibrated.
_DEFAULT_TAU_NS = 12_900_000.0
_DEFAULT_DELAY_NS = 3_850_000.0
_FAMILY_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("H100", "built-in default for H100 (low-pass tau 12.9 ms, delay 3.85 ms; calibrated on H100 SXM, driver 580)"),
    ("H200", "built-in default for Hopper (low-pass tau 12.9 ms, delay 3.85 ms; calibrated on H100 SXM, driver 580)"),
)


def default_sensor_model(gpu_name: str) -> SensorModel:
    """The built-in sensor model for a GPU, by its marketing name."""
    for family, origin in _FAMILY_DEFAULTS:
        if family in gpu_name:
            return SensorModel(Response("lowpass", _DEFAULT_TAU_NS, _DEFAULT_DELAY_NS), origin, None, None)
    return SensorModel(None, f"no sensor model for {gpu_name!r}: response not characterised (run wattscope calibrate)",
                       None, None)


def sensor_model(gpu_name: str, driver_version: str, source: str = "samples") -> SensorModel:
    """The calibrated model of ``source`` when a profile for this GPU model and driver exists, else the default.

    Profiles are read once per process and directory (a calibration in this process replaces the cached one through
    ``forget_profiles``)."""
    directory = str(cache_dir())
    return _cached(gpu_name, driver_version, source, directory)


def forget_profiles() -> None:
    """Drop the profiles read so far (after a calibration wrote a new one)."""
    _cached.cache_clear()


@functools.lru_cache(maxsize=64)
def _cached(gpu_name: str, driver_version: str, source: str, directory: str) -> SensorModel:
    profile = load_profile(gpu_name, driver_version, directory=Path(directory)) if driver_version else None
    if profile is None or source not in profile.sources:
        # The family defaults describe the buffered sample stream only; the fields average differently.
        if source == "samples":
            return default_sensor_model(gpu_name)
        return SensorModel(None, f"no model of {gpu_name!r}'s {source!r} source (run wattscope calibrate)", None,
                           profile.best_source if profile is not None else None)
    cal = profile.sources[source]
    path = str(profile_path(gpu_name, driver_version, Path(directory)))
    return SensorModel(
        response=cal.response(),
        origin=(f"calibrated {profile.created_utc}: {cal.model} "
                f"{'tau' if cal.model == 'lowpass' else 'width'} {cal.shape_ns / 1e6:.1f} ms, "
                f"delay {cal.delay_ns / 1e6:.1f} ms ({os.path.basename(path)})"),
        profile_path=path,
        best_source=profile.best_source,
    )

