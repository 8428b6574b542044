"""pytest plugin: the energy of tests, measured by wattscope.

Registered through the ``pytest11`` entry point, so pytest loads it wherever wattscope is installed, but it is
inert unless ``--wattscope`` (or ``--wattscope-json PATH``) is given: loading it imports neither wattscope's native
core nor NVML, and a disabled run registers no per-test hook. ``-p no:wattscope`` keeps it from loading at all.

When enabled:

* ``@pytest.mark.energy`` measures the test's call phase (fixture set-up and tear-down excluded);
* the ``power_meter`` fixture is a :class:`wattscope.PowerMeter` named after the test, for the test to open where
  it wants (``with power_meter: ...``, or as a decorator); its windows are reported too. It works when the plugin
  is disabled as well (nothing is reported then);
* a test that uses pytest-benchmark's ``benchmark`` fixture is measured, and the energy of its rounds lands in the
  benchmark's ``extra_info`` (``wattscope.energy_j_per_round`` ...), hence in its JSON;
* the terminal summary gets an energy table; ``--wattscope-json PATH`` writes a results file (one region per test,
  one trial per window; a benchmark's rounds of >= 2 sensor periods are trials of ``<test>::rounds``) that
  `wattscope compare` reads;
* when a window cannot open (no NVML, no such GPU) the test still runs, unmeasured, and the summary says why.

Results are computed at the end of the session, so each measured test costs only a window's start and stop (about
15 us) plus its share of the final integration. The energy is whole-device: tests running at the same time on the
same GPU (pytest-xdist) share it; under xdist each worker writes ``PATH`` with its id appended (``energy-gw0.json``),
the controller writes nothing there, and no table is shown.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_RECORDER = "wattscope-recorder"
# A benchmark round shorter than two sensor periods (one period is ~20 ms on H100, so ~40 ms) cannot be measured
# alone: only the mean over all rounds is reported then.
_MIN_ROUND_S = 0.04


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("wattscope", "GPU energy of tests (wattscope)")
    group.addoption("--wattscope", action="store_true", default=False,
                    help="measure tests marked energy, the power_meter fixture's windows and pytest-benchmark tests; "
                    "print an energy table")
    group.addoption("--wattscope-json", metavar="PATH", default=None,
                    help="write the measurements as a wattscope results file (implies --wattscope)")
    group.addoption("--wattscope-devices", metavar="SEL", default=None,
                    help="GPUs to measure: CUDA indices, UUIDs or bus ids, comma separated, or 'all' (default: every "
                    "GPU visible to CUDA)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "energy: measure this test's GPU energy (with --wattscope)")
    json_path = config.getoption("wattscope_json")
    if json_path:
        # Checked now: a session's measurements cannot be written at its end into a directory that is not there.
        parent = Path(json_path).absolute().parent
        if not parent.is_dir():
            raise pytest.UsageError(f"--wattscope-json {json_path}: the directory {parent} does not exist")
    if config.getoption("wattscope") or json_path:
        config.pluginmanager.register(_Recorder(config), _RECORDER)


def _devices(config: pytest.Config) -> Any:
    text = config.getoption("wattscope_devices")
    if text is None:
        return None
    from wattscope.embed.command import parse_devices

    try:
        return parse_devices(text)
    except ValueError as e:
        raise pytest.UsageError(f"--wattscope-devices: {e}") from None


@pytest.fixture
def power_meter(request: pytest.FixtureRequest) -> Any:
    """An unopened wattscope.PowerMeter named after the test: ``with power_meter: work()``, then
    ``power_meter.result``. With --wattscope its windows appear in the energy table and the JSON."""
    from wattscope import PowerMeter

    meter = PowerMeter(_devices(request.config), name=request.node.nodeid)
    yield meter
    recorder = request.config.pluginmanager.get_plugin(_RECORDER)
    if recorder is not None:
        recorder.add_meter(request.node.nodeid, meter)


@dataclass
class _Pending:
    region: str
    meter: Any
    benchmark_rounds: list[tuple[int, int]] | None = None
    benchmark: Any = None
    measurements: list[Any] = field(default_factory=list)
    error: str | None = None


class _Recorder:
    """Registered only when enabled: measures, then reports at the end of the session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.devices = _devices(config)
        self.json_path = config.getoption("wattscope_json")
        self.pending: list[_Pending] = []
        self.sub_regions: dict[str, list[dict[str, object]]] = {}
        self.finalized = False

    # An old-style wrapper: the new style (wrapper=True) needs pluggy >= 1.1, and this module is loaded by whatever
    # pytest the user has, wherever wattscope is installed.
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        funcargs = getattr(item, "funcargs", {})
        bench = funcargs.get("benchmark")
        if item.get_closest_marker("energy") is None and bench is None:
            yield
            return
        from wattscope import PowerMeter, WattscopeError

        entry = _Pending(item.nodeid, PowerMeter(self.devices, name=item.nodeid))
        try:
            entry.meter.start()
        except WattscopeError as e:
            # No NVML, no such GPU: the test still runs, unmeasured, and the summary says why.
            entry.error = str(e)
            self.pending.append(entry)
            yield
            return
        if bench is not None:
            entry.benchmark, entry.benchmark_rounds = bench, _record_rounds(bench)
        try:
            yield
        finally:
            self.pending.append(entry)
            # A failure of the measurement is recorded, never turned into a failure of the user's test.
            try:
                entry.meter.stop()
                if bench is not None:
                    # pytest-benchmark writes extra_info into its JSON at the session's end, and shows it: fill it now.
                    self._resolve(entry)
                    _fill_extra_info(entry, self.sub_regions)
            except Exception as e:
                entry.error = entry.error or f"{type(e).__name__}: {e}"

    def add_meter(self, nodeid: str, meter: Any) -> None:
        if meter.running:
            meter.stop()
        # A marked test that also opens power_meter: keep its windows apart from the whole test's.
        region = f"{nodeid}::power_meter" if any(p.region == nodeid for p in self.pending) else nodeid
        self.pending.append(_Pending(region, meter))

    def _resolve(self, entry: _Pending) -> None:
        from wattscope import MeasurementError, WattscopeError

        if entry.measurements or entry.error:
            return
        try:
            if entry.meter.results:
                entry.measurements = entry.meter.results
            else:
                entry.measurements = [entry.meter.result]
        except MeasurementError as e:
            if "nothing measured yet" not in str(e):  # a power_meter the test never opened: nothing to report
                entry.error = str(e)
        except WattscopeError as e:
            entry.error = str(e)

    def _finalize(self) -> None:
        if self.finalized:
            return
        self.finalized = True
        for entry in self.pending:
            self._resolve(entry)
        if self.json_path and not self._xdist_controller():
            from wattscope.embed.results_file import write_results

            regions: dict[str, list[dict[str, object]]] = {}
            for entry in self.pending:
                regions.setdefault(entry.region, []).extend(m.to_dict() for m in entry.measurements)
            for name, trials in self.sub_regions.items():
                regions.setdefault(name, []).extend(trials)
            path = Path(self.json_path)
            worker = getattr(self.config, "workerinput", {}).get("workerid")
            if worker:
                path = path.with_name(f"{path.stem}-{worker}{path.suffix}")
            write_results(path, {k: v for k, v in regions.items() if v}, tool="pytest")

    def _xdist_controller(self) -> bool:
        """pytest-xdist's controller: it runs no test, its workers write the results files."""
        return self.config.pluginmanager.hasplugin("dsession")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._finalize()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        self._finalize()
        if hasattr(self.config, "workerinput"):
            return
        tr = terminalreporter
        if self._xdist_controller():
            tr.write_sep("=", "wattscope energy")
            if self.json_path:
                path = Path(self.json_path)
                tr.write_line(f"wattscope results: one file per xdist worker, {path.with_name(f'{path.stem}-gw*')}"
                              f"{path.suffix} (no table under xdist)")
            else:
                tr.write_line("the xdist workers measure, and show no table: add --wattscope-json PATH for their "
                              "results")
            return
        tr.write_sep("=", "wattscope energy")
        rows = [("test", "energy_j", "± j", "duration_s", "mean_w", "peak_w", "n")]
        errors: dict[str, list[str]] = {}  # one note per distinct error (no NVML fails every test alike)
        short = 0
        for entry in self.pending:
            ms = entry.measurements
            if entry.error:
                errors.setdefault(entry.error, []).append(entry.region)
            if not ms:
                continue
            e = math.fsum(m.energy_j for m in ms)
            u = math.sqrt(math.fsum(m.uncertainty_j**2 for m in ms))
            d = math.fsum(m.duration_s for m in ms)
            peak = max((m.peak_power_w for m in ms if not math.isnan(m.peak_power_w)), default=math.nan)
            rows.append((entry.region, f"{e:.3f}", f"{u:.3f}", f"{d:.3f}", f"{e / d:.1f}" if d > 0 else "nan",
                         f"{peak:.1f}", str(len(ms))))
            short += any(r.startswith("window shorter") for m in ms for r in m.uncertainty_reasons)
        if len(rows) == 1:
            tr.write_line("no test was measured (mark tests with @pytest.mark.energy, or use power_meter)")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows if len(rows) > 1 else ():
            cells = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            tr.write_line("  ".join([row[0].ljust(widths[0]), *cells]))
        tr.write_line("whole-device energy: every process using the GPUs during a test counts")
        if short:
            tr.write_line(f"{short} of {len(rows) - 1} rows include windows shorter than two sensor periods (~40 ms on "
                          "H100): their energy is mostly uncertainty (the ± column); measure longer work, or repeat it")
        for error, regions in errors.items():
            which = regions[0] if len(regions) == 1 else f"{len(regions)} tests ({regions[0]}, ...)"
            tr.write_line(f"not measured: {which}: {error}")
        if self.json_path:
            tr.write_line(f"wattscope results written to {self.json_path}")


def _record_rounds(bench: Any) -> list[tuple[int, int]]:
    """Stamp every measured round of a pytest-benchmark fixture on CLOCK_MONOTONIC: [(start_ns, end_ns)].

    pytest-benchmark reports each measured round (not its calibration or warm-up) through the stats object's
    ``update(duration)`` right after timing it; wrapping that call stamps the round's end outside the timed region
    (the benchmark's own figures are untouched) and its start as end minus the duration."""
    rounds: list[tuple[int, int]] = []
    add_stats = getattr(bench, "_add_stats", None)
    if add_stats is None:  # another pytest-benchmark layout: the test is still measured as a whole
        return rounds

    def add_and_wrap(stats: Any) -> None:
        update = stats.update

        def stamped(duration: float) -> None:
            end_ns = time.monotonic_ns()
            rounds.append((end_ns - round(duration * 1e9), end_ns))
            update(duration)

        stats.update = stamped
        add_stats(stats)

    bench._add_stats = add_and_wrap
    return rounds


def _fill_extra_info(entry: _Pending, sub_regions: dict[str, list[dict[str, object]]]) -> None:
    from wattscope.embed.windows import sub_window

    rounds, bench = entry.benchmark_rounds, entry.benchmark
    if not rounds or not entry.measurements:
        return
    m = entry.measurements[0]
    start_ns, stop_ns = max(rounds[0][0], m.start_ns), min(rounds[-1][1], m.stop_ns)
    span = sub_window(m, start_ns, stop_ns)
    n = len(rounds)
    iterations = getattr(getattr(bench, "stats", None), "iterations", 1) or 1
    busy_s = math.fsum((b - a) / 1e9 for a, b in rounds)
    # Time between rounds (pytest-benchmark's bookkeeping, pedantic set-up) is not the benchmark's: a round is
    # credited the span's mean power over its own duration.
    scale = busy_s / span.duration_s if span.duration_s > 0 else 0.0
    info: dict[str, object] = {
        "wattscope.energy_j_per_round": span.energy_j * scale / n,
        "wattscope.uncertainty_j_per_round": span.uncertainty_j * scale / n,
        "wattscope.energy_j_per_iteration": span.energy_j * scale / n / iterations,
        "wattscope.mean_power_w": span.energy_j / span.duration_s if span.duration_s > 0 else math.nan,
        "wattscope.rounds": n,
    }
    notes = []
    if scale < 0.9:
        notes.append(f"{1 - scale:.0%} of the rounds' span was spent between rounds: each round is credited the "
                     "span's mean power over its own duration")
    if busy_s / n < _MIN_ROUND_S:
        notes.append(f"rounds shorter than {_MIN_ROUND_S * 1e3:.0f} ms (two sensor periods) cannot be measured one "
                     "by one: the energy per round is the mean over all rounds")
    else:
        sub_regions[f"{entry.region}::rounds"] = [sub_window(m, max(a, m.start_ns), b).to_dict() for a, b in rounds]
    if notes:
        info["wattscope.note"] = "; ".join(notes)
    bench.extra_info.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in info.items()})
