"""Sensor profiles: JSON round trip, schema versions, the cache folder, and loading that never crashes."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wattscope.response import Response
from wattscope.sensor_profile import (
    PROFILE_SCHEMA_VERSION,
    ProfileError,
    ProfileWarning,
    SensorProfile,
    SourceCalibration,
    cache_dir,
    load_profile,
    profile_key,
    profile_path,
    save_profile,
)

GPU = "NVIDIA H100 80GB HBM3"
DRIVER = "580.159.04"


def calibration(source: str, **changes: object) -> SourceCalibration:
    base = SourceCalibration(
        source=source,
        model="lowpass",
        shape_ns=11.5e6,
        delay_ns=3.0e6,
        shape_ci_ns=0.4e6,
        delay_ci_ns=0.07e6,
        low_w=311.0,
        high_w=415.0,
        rel_residual=0.02,
        sample_period_ns=20e6,
        coverage=1.0,
        aliasing_periods_ms=(10.0, 20.0),
        amplitudes=((23.0, 0.45, 0.46), (37.0, 0.66, 0.67)),
        rise_10_90_ns=25.3e6,
        first_change_delay_ns=4.2e6,
    )
    return replace(base, **changes)


def profile(**changes: object) -> SensorProfile:
    base = SensorProfile(
        schema_version=PROFILE_SCHEMA_VERSION,
        gpu_name=GPU,
        gpu_uuid="GPU-0f0e0d0c-0b0a-0908-0706-050403020100",
        driver_version=DRIVER,
        created_utc="2025-01-02T03:04:05Z",
        wattscope_version="0.1.0",
        calibration_s=42.5,
        sources={
            "samples": calibration("samples"),
            # An unbounded interval, no step measured, no aliasing: the awkward values must survive too.
            "average": calibration(
                "average",
                model="boxcar",
                shape_ns=1e9,
                delay_ns=0.0,
                shape_ci_ns=math.inf,
                aliasing_periods_ms=(),
                amplitudes=(),
                rise_10_90_ns=None,
                first_change_delay_ns=None,
            ),
        },
        best_source="samples",
        counter_bias_rel=0.004,
    )
    return replace(base, **changes)


def test_json_round_trip_is_exact_and_standard() -> None:
    original = profile()
    text = original.to_json()

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(text, parse_constant=reject)  # browsers reject NaN/Infinity literals
    assert data["sources"]["average"]["shape_ci_ns"] == "Infinity"
    restored = SensorProfile.from_json(text)
    assert restored == original
    assert isinstance(restored.sources["samples"].amplitudes[0], tuple)
    assert restored.sources["samples"].response() == Response("lowpass", 11.5e6, 3.0e6)
    assert SensorProfile.from_json(profile(counter_bias_rel=None).to_json()).counter_bias_rel is None


@pytest.mark.parametrize(
    "version, hint", [(2, "upgrade wattscope"), (0, "run `wattscope calibrate`"), ("1", "run `wattscope calibrate`")]
)
def test_other_schema_versions_are_rejected(version: object, hint: str) -> None:
    data = json.loads(profile().to_json())
    data["schema_version"] = version
    with pytest.raises(ProfileError, match=f"schema version {version!r}; this wattscope reads version 1") as info:
        SensorProfile.from_json(json.dumps(data))
    assert hint in str(info.value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("gpu_name"), r"missing \['gpu_name'\]"),
        (lambda d: d.update(extra=1), r"unknown \['extra'\]"),
        (lambda d: d["sources"]["samples"].update(shape_ns="fast"), "expected a number"),
        (lambda d: d["sources"]["samples"].update(model="gaussian"), "unknown response kind"),
        (lambda d: d["sources"]["samples"].update(amplitudes=[[1.0, 2.0]]), r"\[period_ms, measured, model\]"),
        (lambda d: d.update(best_source="instant"), "best_source 'instant' is not among"),
        (lambda d: d["sources"].update(instant=d["sources"]["samples"]), "holds the calibration of source"),
        (lambda d: d.update(calibration_s=True), "expected a number"),
    ],
)
def test_malformed_profiles_are_rejected(mutate, message: str) -> None:
    data = json.loads(profile().to_json())
    mutate(data)
    with pytest.raises(ProfileError, match=message):
        SensorProfile.from_json(json.dumps(data))


def test_not_json_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="not valid JSON"):
        SensorProfile.from_json("{ truncated")
    with pytest.raises(ProfileError, match="must be a JSON object"):
        SensorProfile.from_json("[1, 2]")


def test_key_and_path() -> None:
    assert profile().key() == "nvidia-h100-80gb-hbm3_580.159.04"
    assert profile_key(GPU, DRIVER) == profile().key()
    assert profile_path(GPU, DRIVER, Path("/x")) == Path("/x/sensor-profile_nvidia-h100-80gb-hbm3_580.159.04.json")


@given(st.text(), st.text())
def test_key_is_always_a_safe_file_name(name: str, driver: str) -> None:
    key = profile_key(name, driver)
    assert re.fullmatch(r"[a-z0-9.-]+_[a-z0-9.-]+", key)
    assert profile_path(name, driver, Path("/x")).parent == Path("/x")


def test_save_and_load(tmp_path: Path) -> None:
    original = profile()
    path = save_profile(original, tmp_path / "new" / "dir")
    assert path == profile_path(GPU, DRIVER, tmp_path / "new" / "dir")
    assert load_profile(GPU, DRIVER, tmp_path / "new" / "dir") == original
    # Overwriting replaces the file and leaves no temporary behind.
    save_profile(profile(calibration_s=7.0), path.parent)
    assert load_profile(GPU, DRIVER, path.parent).calibration_s == 7.0
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_absent_profile_is_none_without_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_profile(GPU, DRIVER, tmp_path) is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("{ not json", "not valid JSON"),
        (json.dumps({**json.loads(profile().to_json()), "schema_version": 99}), "schema version 99"),
        (profile(gpu_name="NVIDIA A100-SXM4-40GB").to_json(), "written for 'NVIDIA A100-SXM4-40GB'"),
    ],
)
def test_unusable_profile_warns_and_gives_none(tmp_path: Path, content: str, message: str) -> None:
    profile_path(GPU, DRIVER, tmp_path).write_text(content)
    with pytest.warns(ProfileWarning, match=message):
        assert load_profile(GPU, DRIVER, tmp_path) is None


def test_unreadable_profile_warns_and_gives_none(tmp_path: Path) -> None:
    profile_path(GPU, DRIVER, tmp_path).mkdir()  # a folder where the file should be
    with pytest.warns(ProfileWarning, match="cannot read it"):
        assert load_profile(GPU, DRIVER, tmp_path) is None


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WATTSCOPE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "wattscope"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says to ignore relative paths
    assert cache_dir() == tmp_path / "home" / ".cache" / "wattscope"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "wattscope"
    monkeypatch.setenv("WATTSCOPE_CACHE_DIR", "")
    assert cache_dir() == tmp_path / "xdg" / "wattscope"
    monkeypatch.setenv("WATTSCOPE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    # save/load default to it.
    save_profile(profile())
    assert (tmp_path / "mine" / profile_path(GPU, DRIVER).name).exists()
    assert load_profile(GPU, DRIVER) == profile()


def test_profile_checks_its_sources() -> None:
    with pytest.raises(ValueError, match="best_source 'instant' is not among"):
        profile(best_source="instant")
    with pytest.raises(ValueError, match="holds the calibration of source 'samples'"):
        profile(sources={"instant": calibration("samples")}, best_source="instant")
