"""RAPL through a fake powercap tree: domains, wrap-around, and the reasons when it cannot be read."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from wattscope import MeasurementError, rapl
from wattscope.rapl import RaplMeter, discover

MAX_UJ = 262_143_328_850


def _zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def _set(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def two_sockets(tmp_path: Path) -> dict[str, Path]:
    """Two packages, each with core and dram sub-zones, a psys zone, and the control-type directory."""
    (tmp_path / "intel-rapl").mkdir()  # the control type itself: not a zone
    zones = {
        "package-0": _zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000),
        "core-0": _zone(tmp_path, "intel-rapl:0:0", "core", 5_000),
        "dram-0": _zone(tmp_path, "intel-rapl:0:1", "dram", 2_000_000),
        "package-1": _zone(tmp_path, "intel-rapl:1", "package-1", 3_000_000),
        "dram-1": _zone(tmp_path, "intel-rapl:1:1", "dram", 0),
        "psys": _zone(tmp_path, "intel-rapl:2", "psys", 7_000_000),
    }
    return zones


def test_discover_keeps_package_and_dram_per_socket(tmp_path: Path, two_sockets: dict[str, Path]) -> None:
    domains, reason = discover(tmp_path)
    assert reason is None
    assert [d.name for d in domains] == ["package-0", "dram-0", "package-1", "dram-1"]
    assert all(d.max_energy_range_uj == MAX_UJ for d in domains)


def test_energy_over_a_window_sums_package_and_dram(tmp_path: Path, two_sockets: dict[str, Path]) -> None:
    meter = RaplMeter(tmp_path, poll_period_s=None).start()
    _set(two_sockets["package-0"], 1_000_000 + 12_500_000)   # +12.5 J
    _set(two_sockets["dram-0"], 2_000_000 + 1_500_000)       # +1.5 J
    _set(two_sockets["package-1"], 3_000_000 + 10_000_000)   # +10 J
    _set(two_sockets["core-0"], 99_000_000)                  # inside the package: not added
    _set(two_sockets["psys"], 99_000_000)                    # spans package and DRAM: not added
    time.sleep(0.01)
    r = meter.stop().result
    assert r.available and r.reason is None
    assert r.energy_j == pytest.approx(24.0, abs=1e-9)
    by_name = {d.name: d for d in r.domains}
    assert by_name["package-0"].energy_j == pytest.approx(12.5)
    assert by_name["dram-1"].energy_j == 0.0
    assert r.duration_s >= 0.01
    assert r.mean_power_w == pytest.approx(24.0 / r.duration_s)
    flat = r.to_dict()
    assert flat["cpu.energy_j"] == pytest.approx(24.0)
    assert flat["cpu.dram-0.energy_j"] == pytest.approx(1.5)
    assert flat["cpu.reason"] is None
    assert "whole socket" in str(r)


def test_wrap_around_between_reads(tmp_path: Path) -> None:
    max_uj = 65_532_610_987
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", max_uj - 1_000_000, max_uj)
    meter = RaplMeter(tmp_path, poll_period_s=None).start()
    _set(zone, 2_000_000)  # ran past the top: 1 J to the top, 1 µJ to get to 0, then 2 J
    meter.poll()
    _set(zone, 2_500_000)
    r = meter.stop().result
    assert r.domains[0].wraps == 1
    assert r.energy_j == pytest.approx(3.5 + 1e-6, abs=1e-9)


def test_several_wraps_are_caught_by_polling(tmp_path: Path) -> None:
    max_uj = 10_000_000  # a 10 J counter
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 0, max_uj)
    meter = RaplMeter(tmp_path, poll_period_s=None).start()
    for value in (6_000_000, 1_000_000, 7_000_000, 2_000_000):  # 6 + 5 + 6 + 5 J (two wraps)
        _set(zone, value)
        meter.poll()
    r = meter.stop().result
    assert r.domains[0].wraps == 2
    assert r.energy_j == pytest.approx(22.0 + 2e-6, abs=1e-9)


def test_the_background_thread_polls(tmp_path: Path) -> None:
    max_uj = 10_000_000
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 0, max_uj)
    with RaplMeter(tmp_path, poll_period_s=0.02) as meter:
        for value in (8_000_000, 3_000_000, 9_000_000, 4_000_000):  # two wraps: only a polling reader sees both
            _set(zone, value)
            time.sleep(0.15)
    r = meter.result
    assert r.domains[0].wraps == 2
    assert r.energy_j == pytest.approx(24.0 + 2e-6, abs=1e-9)


def test_no_powercap_says_why(tmp_path: Path) -> None:
    r = RaplMeter(tmp_path / "missing").start().stop().result
    assert not r.available and math.isnan(r.energy_j)
    assert "does not exist" in r.reason
    assert "unavailable" in str(r)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "intel-rapl").mkdir()
    r = RaplMeter(empty).start().stop().result
    assert not r.available and "no RAPL zones" in r.reason
    only_psys = tmp_path / "psys"
    _zone(only_psys, "intel-rapl:0", "psys", 0)
    assert "no package or DRAM domain" in RaplMeter(only_psys).start().stop().result.reason


def test_unreadable_counter_says_why(tmp_path: Path, two_sockets: dict[str, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, which chmod cannot lock out: the kernel's answer to other users is raised instead.
    real_read = rapl._read_int

    def read(path: Path) -> int:
        if path.name == "energy_uj" and path.parent.name.startswith("intel-rapl:0"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(rapl, "_read_int", read)
    meter = RaplMeter(tmp_path, poll_period_s=None).start()
    _set(two_sockets["package-1"], 3_000_000 + 4_000_000)
    r = meter.stop().result
    assert r.available  # socket 1 still reads
    assert [d.name for d in r.domains] == ["package-1", "dram-1"]
    assert r.energy_j == pytest.approx(4.0)
    assert "CVE-2020-8694" in r.reason and "intel-rapl:0" in r.reason

    monkeypatch.setattr(rapl, "_read_int", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if path.name == "energy_uj" else real_read(path))
    r = RaplMeter(tmp_path, poll_period_s=None).start().stop().result
    assert not r.available and "only root" in r.reason
    assert f"sudo chmod o+r {tmp_path}/intel-rapl:*/energy_uj" in r.reason  # the root actually read


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="poll_period_s"):
        RaplMeter(poll_period_s=0)
    with pytest.raises(MeasurementError, match="not closed"):
        _ = RaplMeter().result
    with pytest.raises(MeasurementError, match="without a matching start"):
        RaplMeter().stop()
    meter = RaplMeter(poll_period_s=None).start()
    with pytest.raises(MeasurementError, match="called twice"):
        meter.start()


def test_an_unlistable_root_is_a_reason_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, which chmod cannot lock out: the kernel's answer to other users is raised instead.
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # noqa: ANN202
        if self == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert discover(tmp_path) == ([], f"cannot list {tmp_path}: Permission denied")
    r = RaplMeter(tmp_path, poll_period_s=None).start().stop().result
    assert not r.available and r.reason == f"cannot list {tmp_path}: Permission denied"
