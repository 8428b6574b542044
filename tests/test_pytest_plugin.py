"""The pytest plugin, driven with pytester against the fake NVML (in-process, and in a subprocess through the env)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from wattscope import _session, cli

pytest_plugins = ("pytester",)


def _plugin_args(*, benchmark: bool = False) -> list[str]:
    """Load the plugin explicitly unless its entry point is installed (pytest refuses to register it twice); leave
    hypothesis out, and pytest-benchmark where it is not used (each adds ~0.5 s to an inner session)."""
    installed = any(ep.value == "wattscope.pytest_plugin"
                    for ep in importlib.metadata.entry_points(group="pytest11"))
    args = [] if installed else ["-p", "wattscope.pytest_plugin"]
    return args + ["-p", "no:hypothesispytest"] + ([] if benchmark else ["-p", "no:benchmark"])


def test_the_entry_point_is_declared() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["pytest11"] == {"wattscope": "wattscope.pytest_plugin"}


_SUITE = """
    import time
    import pytest

    @pytest.mark.energy
    def test_marked():
        time.sleep(0.2)

    def test_unmarked():
        time.sleep(0.01)

    def test_meter(power_meter):
        with power_meter:
            time.sleep(0.1)
        assert power_meter.result.duration_s >= 0.1

    def test_decorated(power_meter):
        @power_meter
        def step():
            time.sleep(0.03)
        for _ in range(3):
            step()

    def test_unused_meter(power_meter):
        pass

    @pytest.mark.energy
    def test_marked_with_meter(power_meter):
        with power_meter:
            time.sleep(0.02)
"""


def test_marked_tests_and_power_meter_are_measured(fake, pytester: pytest.Pytester) -> None:
    fake.set_trace(0, [0.0], [150.0])
    pytester.makepyfile(test_suite=_SUITE)
    out = pytester.path / "energy.json"
    result = pytester.runpytest(*_plugin_args(), "--wattscope", f"--wattscope-json={out}")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*wattscope energy*", "test*energy_j*mean_w*", "*test_suite.py::test_marked *150.0*",
                                 "*whole-device energy*"])
    assert "test_unmarked" not in result.stdout.str().split("wattscope energy")[1]
    doc = json.loads(out.read_text())
    regions = doc["regions"]
    names = ("test_marked", "test_meter", "test_decorated", "test_marked_with_meter",
             "test_marked_with_meter::power_meter")
    assert set(regions) == {f"test_suite.py::{n}" for n in names}
    inner = regions["test_suite.py::test_marked_with_meter::power_meter"][0]
    assert inner["duration_s"] < regions["test_suite.py::test_marked_with_meter"][0]["duration_s"]
    (marked,) = regions["test_suite.py::test_marked"]
    assert marked["duration_s"] == pytest.approx(0.2, abs=0.05)
    assert marked["energy_j"] == pytest.approx(150.0 * marked["duration_s"], rel=1e-6)
    assert regions["test_suite.py::test_meter"][0]["duration_s"] == pytest.approx(0.1, abs=0.03)
    decorated = regions["test_suite.py::test_decorated"]
    assert len(decorated) == 3 and all(t["mean_power_w"] == pytest.approx(150.0) for t in decorated)


def test_disabled_plugin_measures_nothing(fake, pytester: pytest.Pytester) -> None:
    fake.set_trace(0, [0.0], [150.0])
    pytester.makepyfile(test_suite=_SUITE)
    before = fake.call_count("nvmlDeviceGetSamples")
    result = pytester.runpytest(*_plugin_args())
    result.assert_outcomes(passed=6)  # the marker is registered (no warning) and power_meter still works
    assert "wattscope energy" not in result.stdout.str()
    assert "PytestUnknownMarkWarning" not in result.stdout.str()
    assert fake.call_count("nvmlDeviceGetSamples") > before  # only the tests' own power_meter windows sampled


def test_without_nvml_tests_run_unmeasured_and_the_summary_says_why(pytester: pytest.Pytester,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTSCOPE_NVML_PATH", str(pytester.path / "no-libnvidia-ml.so.1"))
    _session.reset()
    pytester.makepyfile(test_x="""
        import pytest
        @pytest.mark.energy
        def test_a():
            pass
        @pytest.mark.energy
        def test_b():
            pass
    """)
    out = pytester.path / "energy.json"
    try:
        result = pytester.runpytest(*_plugin_args(), f"--wattscope-json={out}")
    finally:
        _session.reset()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*no test was measured*", "not measured: 2 tests (test_x.py::test_a, ...): *NVML*"])
    assert json.loads(out.read_text())["regions"] == {}


def test_loading_the_plugin_imports_no_native_code(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import sys
        def pytest_sessionfinish(session):
            print("native loaded:", "wattscope._core" in sys.modules)
    """)
    pytester.makepyfile(test_x="""
        import pytest
        @pytest.mark.energy
        def test_x():
            pass
    """)
    result = pytester.runpytest_subprocess(*_plugin_args(), "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*native loaded: False*"])


def test_subprocess_run_uses_the_fake_through_the_environment(fake, pytester: pytest.Pytester) -> None:
    # The fake's trace lives in each process: the child's conftest programs its own copy, found through
    # WATTSCOPE_NVML_PATH, which the fake fixture exported.
    pytester.makeconftest("""
        from wattscope.testing import FakeNvml
        def pytest_configure(config):
            FakeNvml().set_trace(0, [0.0], [222.0])
    """)
    pytester.makepyfile(test_x="""
        import time, pytest
        @pytest.mark.energy
        def test_x():
            time.sleep(0.1)
    """)
    out = pytester.path / "energy.json"
    result = pytester.runpytest_subprocess(*_plugin_args(), f"--wattscope-json={out}")
    result.assert_outcomes(passed=1)
    (trial,) = json.loads(out.read_text())["regions"]["test_x.py::test_x"]
    assert trial["mean_power_w"] == pytest.approx(222.0)


def test_benchmark_rounds_get_energy_in_extra_info(fake, pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_benchmark")
    fake.set_trace(0, [0.0], [150.0])
    pytester.makepyfile(test_bench="""
        import time

        def test_slow_rounds(benchmark):
            benchmark.pedantic(time.sleep, args=(0.05,), rounds=4, iterations=1)

        def test_fast_rounds(benchmark):
            benchmark.pedantic(sum, args=(range(200),), rounds=3000, iterations=10)
    """)
    bench_json = pytester.path / "bench.json"
    out = pytester.path / "energy.json"
    result = pytester.runpytest(*_plugin_args(benchmark=True), "--wattscope", f"--wattscope-json={out}",
                                f"--benchmark-json={bench_json}")
    result.assert_outcomes(passed=2)
    benches = {b["name"]: b for b in json.loads(bench_json.read_text())["benchmarks"]}
    slow = benches["test_slow_rounds"]
    info = slow["extra_info"]
    assert info["wattscope.rounds"] == 4
    round_s = slow["stats"]["mean"]
    assert info["wattscope.energy_j_per_round"] == pytest.approx(150.0 * round_s, rel=0.02)
    assert info["wattscope.mean_power_w"] == pytest.approx(150.0, rel=0.02)
    fast = benches["test_fast_rounds"]
    info = fast["extra_info"]
    assert info["wattscope.rounds"] == fast["stats"]["rounds"] == 3000
    assert "rounds shorter" in info["wattscope.note"]
    assert info["wattscope.energy_j_per_iteration"] == pytest.approx(150.0 * fast["stats"]["mean"], rel=0.02)
    regions = json.loads(out.read_text())["regions"]
    rounds = regions["test_bench.py::test_slow_rounds::rounds"]
    assert len(rounds) == 4 and all(r["energy_j"] == pytest.approx(150.0 * r["duration_s"]) for r in rounds)
    assert "test_bench.py::test_fast_rounds::rounds" not in regions
    assert "test_bench.py::test_fast_rounds" in regions  # the whole test is measured


def test_compare_gates_two_plugin_runs(fake, pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    pytester.makepyfile(test_suite="""
        import time

        def test_step(power_meter):
            @power_meter
            def step():
                time.sleep(0.05)
            for _ in range(4):
                step()
    """)
    paths = []
    for power_w in (100.0, 130.0):
        fake.set_trace(0, [0.0, 0.013], [power_w, power_w * 0.9], repeat_period_s=0.031)
        # A new trace restarts the fake's energy counter: start a fresh timeline too (with the fixture's cadences).
        _session.reset(linger_ns=500_000_000, energy_period_ns=100_000_000)
        paths.append(pytester.path / f"{power_w:.0f}.json")
        pytester.runpytest(*_plugin_args(), f"--wattscope-json={paths[-1]}").assert_outcomes(passed=1)
    capsys.readouterr()
    assert cli.main(["compare", str(paths[0]), str(paths[1])]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert cli.main(["compare", str(paths[1]), str(paths[0])]) == 0


def test_a_json_path_in_a_missing_directory_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_a():\n    pass\n")
    missing = pytester.path / "no-such-dir" / "out.json"
    result = pytester.runpytest(*_plugin_args(), f"--wattscope-json={missing}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--wattscope-json {missing}: the directory {missing.parent} does not exist*"])


def test_a_failing_measurement_does_not_fail_the_test(fake, pytester: pytest.Pytester) -> None:
    fake.set_trace(0, [0.0], [150.0])
    pytester.makeconftest("""
        import pytest
        import wattscope

        @pytest.fixture(autouse=True)
        def broken_stop(monkeypatch):
            def stop(self):
                raise RuntimeError("boom")
            monkeypatch.setattr(wattscope.PowerMeter, "stop", stop)
    """)
    pytester.makepyfile(test_x="""
        import pytest
        @pytest.mark.energy
        def test_a():
            pass
    """)
    result = pytester.runpytest(*_plugin_args(), "--wattscope")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["not measured: test_x.py::test_a: RuntimeError: boom"])


def test_the_xdist_controller_writes_no_results_file(fake, pytester: pytest.Pytester) -> None:
    fake.set_trace(0, [0.0], [150.0])
    # pytest-xdist's controller is the session that has the "dsession" plugin: stand one in.
    pytester.makeconftest("""
        def pytest_configure(config):
            config.pluginmanager.register(object(), "dsession")
    """)
    pytester.makepyfile(test_x="""
        import pytest
        @pytest.mark.energy
        def test_a():
            pass
    """)
    out = pytester.path / "energy.json"
    result = pytester.runpytest(*_plugin_args(), f"--wattscope-json={out}")
    result.assert_outcomes(passed=1)
    assert not out.exists()
    result.stdout.fnmatch_lines([f"wattscope results: one file per xdist worker, {pytester.path / 'energy-gw*.json'}*"])
