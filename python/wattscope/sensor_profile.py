"""Sensor profiles: what ``wattscope calibrate`` learned about a GPU's power sources, kept on disk as JSON.

A profile holds, per power source, the fitted response (model, shape, delay, their 95 % half-widths), the load's
levels, the fit quality, the source's sample period, coverage, aliasing periods and amplitude table, and a
model-free step view. It is keyed by GPU name and driver version (the sensor's behaviour belongs to the board
model and the driver's firmware interface, not to one board), stored under :func:`cache_dir`, and loaded by
PowerMeter. A profile that cannot be read never breaks a measurement: :func:`load_profile` warns and returns None,
and measurements fall back to the built-in defaults (wattscope.sensor).

JSON: plain objects; tuples become lists; non-finite floats (an unbounded confidence interval) are written as the
strings ``"Infinity"``, ``"-Infinity"``, ``"NaN"`` so that the file stays standard JSON that browsers can parse.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import WattscopeError
from .files import write_atomic
from .response import Response

__all__ = [
    "PROFILE_SCHEMA_VERSION",
    "ProfileError",
    "ProfileWarning",
    "SensorProfile",
    "SourceCalibration",
    "cache_dir",
    "load_profile",
    "profile_key",
    "profile_path",
    "save_profile",
]

PROFILE_SCHEMA_VERSION = 1
CACHE_DIR_ENV = "WATTSCOPE_CACHE_DIR"
_RECALIBRATE = "run `wattscope calibrate` to write a new one"


class ProfileError(WattscopeError):
    """A sensor profile could not be read: malformed, or written for another schema version."""


class ProfileWarning(UserWarning):
    """A stored sensor profile was ignored (measurements use the built-in sensor defaults instead)."""


@dataclass(frozen=True)
class SourceCalibration:
    """One power source's calibration, as plain data (see wattscope.calibration.fit.SourceFit for the meaning).

    Times are ns, powers W, ``aliasing_periods_ms`` ms; ``amplitudes`` holds ``(period_ms, measured ratio,
    model ratio)``; the step fields are None when no step was measured for this source.
    """

    source: str
    model: str
    shape_ns: float
    delay_ns: float
    shape_ci_ns: float
    delay_ci_ns: float
    low_w: float
    high_w: float
    rel_residual: float
    sample_period_ns: float
    coverage: float
    aliasing_periods_ms: tuple[float, ...]
    amplitudes: tuple[tuple[float, float, float], ...]
    rise_10_90_ns: float | None
    first_change_delay_ns: float | None

    def response(self) -> Response:
        return Response(self.model, self.shape_ns, self.delay_ns)


@dataclass(frozen=True)
class SensorProfile:
    """Everything calibration learned about one GPU model under one driver.

    Attributes:
        schema_version: :data:`PROFILE_SCHEMA_VERSION` when written by this wattscope.
        gpu_name, gpu_uuid, driver_version: the GPU calibrated (the UUID names the board it was measured on).
        created_utc: ISO 8601 UTC time of the calibration.
        wattscope_version: the version that wrote it.
        calibration_s: how long the calibration load ran, s.
        sources: per source name (``"samples"``, ``"instant"``, ``"average"``, ``"energy_counter"``).
        best_source: the source measurements should use.
        counter_bias_rel: ``(counter delta - integrated samples) / integrated samples`` over the calibration; None
            when either was missing.
    """

    schema_version: int
    gpu_name: str
    gpu_uuid: str
    driver_version: str
    created_utc: str
    wattscope_version: str
    calibration_s: float
    sources: dict[str, SourceCalibration]
    best_source: str
    counter_bias_rel: float | None

    def __post_init__(self) -> None:
        for name, cal in self.sources.items():
            if cal.source != name:
                raise ValueError(f"sources[{name!r}] holds the calibration of source {cal.source!r}")
        if self.best_source not in self.sources:
            raise ValueError(f"best_source {self.best_source!r} is not among the sources {sorted(self.sources)}")

    def key(self) -> str:
        """Stable, file-name-safe key from the GPU name and driver version."""
        return profile_key(self.gpu_name, self.driver_version)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(_encode_floats(data), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SensorProfile:
        """Parse a profile. Raises ProfileError when the text is malformed or of another schema version."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"sensor profile is not valid JSON ({e}); {_RECALIBRATE}") from None
        if not isinstance(data, dict):
            raise ProfileError(f"sensor profile must be a JSON object, got {type(data).__name__}; {_RECALIBRATE}")
        version = data.get("schema_version")
        if version != PROFILE_SCHEMA_VERSION:
            newer = isinstance(version, int) and version > PROFILE_SCHEMA_VERSION
            hint = "upgrade wattscope to read it, or " + _RECALIBRATE if newer else _RECALIBRATE
            raise ProfileError(
                f"sensor profile has schema version {version!r}; this wattscope reads version "
                f"{PROFILE_SCHEMA_VERSION}: {hint}"
            )
        top = _fields_of(cls, data, "sensor profile")
        sources_raw = top["sources"]
        if not isinstance(sources_raw, dict):
            raise ProfileError(f"sensor profile: 'sources' must be an object; {_RECALIBRATE}")
        sources = {}
        for name, raw in sources_raw.items():
            if not isinstance(raw, dict):
                raise ProfileError(f"sensor profile: sources[{name!r}] must be an object; {_RECALIBRATE}")
            item = _fields_of(SourceCalibration, raw, f"sources[{name!r}]")
            try:
                sources[name] = SourceCalibration(
                    source=_str(item["source"]),
                    model=_str(item["model"]),
                    shape_ns=_float(item["shape_ns"]),
                    delay_ns=_float(item["delay_ns"]),
                    shape_ci_ns=_float(item["shape_ci_ns"]),
                    delay_ci_ns=_float(item["delay_ci_ns"]),
                    low_w=_float(item["low_w"]),
                    high_w=_float(item["high_w"]),
                    rel_residual=_float(item["rel_residual"]),
                    sample_period_ns=_float(item["sample_period_ns"]),
                    coverage=_float(item["coverage"]),
                    aliasing_periods_ms=tuple(_float(p) for p in _list(item["aliasing_periods_ms"])),
                    amplitudes=tuple(_triple(a) for a in _list(item["amplitudes"])),
                    rise_10_90_ns=_opt_float(item["rise_10_90_ns"]),
                    first_change_delay_ns=_opt_float(item["first_change_delay_ns"]),
                )
                sources[name].response()  # validates model, shape and delay
            except (TypeError, ValueError) as e:
                raise ProfileError(f"sensor profile: sources[{name!r}]: {e}; {_RECALIBRATE}") from None
        try:
            return cls(
                schema_version=PROFILE_SCHEMA_VERSION,
                gpu_name=_str(top["gpu_name"]),
                gpu_uuid=_str(top["gpu_uuid"]),
                driver_version=_str(top["driver_version"]),
                created_utc=_str(top["created_utc"]),
                wattscope_version=_str(top["wattscope_version"]),
                calibration_s=_float(top["calibration_s"]),
                sources=sources,
                best_source=_str(top["best_source"]),
                counter_bias_rel=_opt_float(top["counter_bias_rel"]),
            )
        except (TypeError, ValueError) as e:
            raise ProfileError(f"sensor profile: {e}; {_RECALIBRATE}") from None


# -- JSON helpers ---------------------------------------------------------------------------------------------------

_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _encode_floats(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_floats(v) for v in value]
    return value


def _fields_of(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    missing = sorted(names - data.keys())
    unknown = sorted(data.keys() - names)
    if missing or unknown:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise ProfileError(f"{where}: {', '.join(parts)} fields; {_RECALIBRATE}")
    return data


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else _float(value)


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value


def _triple(value: Any) -> tuple[float, float, float]:
    items = _list(value)
    if len(items) != 3:
        raise ValueError(f"expected [period_ms, measured, model], got {value!r}")
    return (_float(items[0]), _float(items[1]), _float(items[2]))


# -- storage --------------------------------------------------------------------------------------------------------


def profile_key(gpu_name: str, driver_version: str) -> str:
    """``"nvidia-h100-80gb-hbm3_580.159.04"``: lower case, runs of other characters than [a-z0-9.] become '-'."""

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"

    return f"{slug(gpu_name)}_{slug(driver_version)}"


def cache_dir() -> Path:
    """``$WATTSCOPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/wattscope``, else ``~/.cache/wattscope``.

    An empty variable counts as unset, and a relative ``XDG_CACHE_HOME`` is ignored (the XDG spec says so).
    """
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "wattscope"
    return Path.home() / ".cache" / "wattscope"


def profile_path(gpu_name: str, driver_version: str, directory: Path | None = None) -> Path:
    """Where the profile of this GPU model and driver lives (``directory`` defaults to :func:`cache_dir`)."""
    base = cache_dir() if directory is None else Path(directory)
    return base / f"sensor-profile_{profile_key(gpu_name, driver_version)}.json"


def save_profile(profile: SensorProfile, directory: Path | None = None) -> Path:
    """Write the profile atomically (a temporary file in the same folder, then a rename) and return its path."""
    path = profile_path(profile.gpu_name, profile.driver_version, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, profile.to_json())


def load_profile(gpu_name: str, driver_version: str, directory: Path | None = None) -> SensorProfile | None:
    """The stored profile of this GPU model and driver, or None when there is none.

    A file that cannot be read, is corrupt, has another schema version or names another GPU gives a
    :class:`ProfileWarning` and None: measurements then use the built-in defaults and never crash on a bad cache.
    """
    path = profile_path(gpu_name, driver_version, directory)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(
            f"ignoring sensor profile {path}: cannot read it ({e}); {_RECALIBRATE}", ProfileWarning, stacklevel=2
        )
        return None
    try:
        profile = SensorProfile.from_json(text)
    except ProfileError as e:
        warnings.warn(f"ignoring sensor profile {path}: {e}", ProfileWarning, stacklevel=2)
        return None
    if profile.key() != profile_key(gpu_name, driver_version):
        warnings.warn(
            f"ignoring sensor profile {path}: it was written for {profile.gpu_name!r} with driver "
            f"{profile.driver_version!r}, not {gpu_name!r} with driver {driver_version!r}; {_RECALIBRATE}",
            ProfileWarning,
            stacklevel=2,
        )
        return None
    return profile
