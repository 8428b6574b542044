"""Overhead of the pytest plugin per measured test, against the fake NVML (no GPU needed).

    python bench/plugin_overhead_bench.py [--small 100] [--large 1000] [--repeats 5]

Runs pytest in a fresh process on a generated suite of N trivial tests marked ``energy``, with the plugin loaded
but off, and with ``--wattscope`` (and ``--wattscope-json``), for two suite sizes. The fixed costs (NVML start,
the wait for the last window's readings, the table) cancel in the difference between the sizes:

    overhead per test = ((on_large - off_large) - (on_small - off_small)) / (large - small)

It includes the window's start and stop around each test, the plugin's hooks and each test's share of the result
computation at the session's end. Best of ``--repeats`` wall times per configuration.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path


def _suite(directory: Path, n: int) -> Path:
    path = directory / f"suite{n}"
    path.mkdir()
    (path / "conftest.py").write_text(textwrap.dedent("""
        from wattscope.testing import FakeNvml

        def pytest_configure(config):
            FakeNvml().set_trace(0, [0.0, 0.01], [100.0, 300.0], repeat_period_s=0.03)
    """))
    body = ["import pytest", ""]
    for i in range(n):
        body += ["@pytest.mark.energy", f"def test_{i}():", "    pass", ""]
    (path / "test_suite.py").write_text("\n".join(body))
    return path


def _wall_s(suite: Path, extra: list[str], env: dict[str, str], repeats: int) -> float:
    installed = any(ep.value == "wattscope.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
            "-p", "no:hypothesispytest", *([] if installed else ["-p", "wattscope.pytest_plugin"]), *extra, str(suite)]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = subprocess.run(args, env=env, cwd=suite, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"pytest failed:\n{p.stdout}\n{p.stderr}")
        best = min(best, elapsed)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from wattscope.testing import fake_nvml_path

    env = {**os.environ, "WATTSCOPE_NVML_PATH": str(fake_nvml_path())}
    print(f"# plugin_overhead_bench  {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"# command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    with tempfile.TemporaryDirectory() as tmp:
        walls = {}
        for n in (args.small, args.large):
            suite = _suite(Path(tmp), n)
            walls[n, "off"] = _wall_s(suite, [], env, args.repeats)
            walls[n, "on"] = _wall_s(suite, ["--wattscope", f"--wattscope-json={suite / 'w.json'}"], env, args.repeats)
            print(f"{n:6d} marked tests: off {walls[n, 'off']:.3f} s, --wattscope {walls[n, 'on']:.3f} s "
                  f"(difference {walls[n, 'on'] - walls[n, 'off']:.3f} s)")
    on_minus_off = {n: walls[n, "on"] - walls[n, "off"] for n in (args.small, args.large)}
    extra_s = on_minus_off[args.large] - on_minus_off[args.small]
    per_test_ms = extra_s / (args.large - args.small) * 1e3
    print(f"overhead per measured test: {per_test_ms:.3f} ms (goal < 1 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
