"""Smoke tests of the native kernel tracer (_core.Cupti, _core.KernelTracer) against the fake CUPTI library.

The tracer itself is tested natively (csrc/tests/test_tracer.cpp, under sanitizers); these check the binding: the
fake is loaded through the real dlopen path, records come back as numpy arrays on the monotonic clock, drops are
counted, and CUPTI errors become WattscopeError.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import open_fake_cupti

from wattscope import _core
from wattscope.errors import WattscopeError

KIND_KERNEL = 10
KIND_MEMCPY = 1
CUPTI_ERROR_INSUFFICIENT_PRIVILEGES = 35


@pytest.fixture
def fake_cupti(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WATTSCOPE_CUPTI_PATH", raising=False)
    lib = open_fake_cupti()
    path = lib.path
    cupti = _core.Cupti(str(path), [])
    if Path(cupti.path).resolve() != path.resolve():
        pytest.skip(f"a real libcupti is already loaded in this process ({cupti.path}); it is reused, not the fake")
    yield lib, cupti
    lib.fake_cupti_reset()


def test_records_come_back_as_arrays_on_the_monotonic_clock(fake_cupti) -> None:
    lib, cupti = fake_cupti
    assert cupti.version == 130001
    tracer = _core.KernelTracer(cupti)
    tracer.start()
    time.sleep(0.002)
    now_ns = time.monotonic_ns()
    assert lib.fake_cupti_inject(KIND_KERNEL, 0, 7, b"gemm", now_ns - 300_000, now_ns - 200_000, 1) == 1
    assert lib.fake_cupti_inject(KIND_KERNEL, 0, 7, b"relu", now_ns - 150_000, now_ns - 100_000, 2) == 1
    assert lib.fake_cupti_inject(KIND_MEMCPY, 0, 3, None, now_ns - 50_000, now_ns - 40_000, 3) == 1
    assert tracer.flush()
    # A clock switch (torch.profiler's TSC ticks) mid-run: later records still land on the monotonic clock.
    lib.fake_cupti_set_clock(2.5, 987_654_321)
    time.sleep(0.002)
    later_ns = time.monotonic_ns()
    assert lib.fake_cupti_inject(KIND_KERNEL, 1, 7, b"gemm", later_ns - 30_000, later_ns - 10_000, 4) == 1
    time.sleep(0.002)
    tracer.stop()
    assert not tracer.running

    snap = tracer.snapshot()
    assert snap["start_ns"].dtype == np.int64 and snap["end_ns"].dtype == np.int64
    expected_start_ns = np.array([now_ns - 300_000, now_ns - 150_000, now_ns - 50_000, later_ns - 30_000])
    expected_end_ns = np.array([now_ns - 200_000, now_ns - 100_000, now_ns - 40_000, later_ns - 10_000])
    assert np.max(np.abs(snap["start_ns"] - expected_start_ns)) <= 1_000
    assert np.max(np.abs(snap["end_ns"] - expected_end_ns)) <= 1_000
    names = [snap["names"][i] if i >= 0 else None for i in snap["name_index"]]
    assert names == ["gemm", "relu", None, "gemm"]
    assert snap["kind"].tolist() == [KIND_KERNEL, KIND_KERNEL, KIND_MEMCPY, KIND_KERNEL]
    assert snap["stream_id"].tolist() == [7, 7, 3, 7]
    assert snap["device_id"].tolist() == [0, 0, 0, 1]
    assert snap["correlation_id"].tolist() == [1, 2, 3, 4]
    assert snap["clock_segments"] == 2
    assert snap["records_dropped"] == 0 and snap["buffers_refused"] == 0
    assert tracer.failures() == []


def test_pool_exhaustion_is_counted(fake_cupti) -> None:
    lib, cupti = fake_cupti
    tracer = _core.KernelTracer(cupti, buffer_bytes=1024, buffer_count=1)  # room for 4 kernel records
    tracer.start()
    now_ns = time.monotonic_ns()
    recorded = sum(lib.fake_cupti_inject(KIND_KERNEL, 0, 1, b"k", now_ns - 1_000, now_ns, i) for i in range(10))
    assert recorded == 4
    tracer.stop()
    snap = tracer.snapshot()
    assert len(snap["start_ns"]) == 4
    assert snap["buffers_refused"] == 6
    assert snap["records_dropped"] == 6


def test_cupti_failure_raises_wattscope_error(fake_cupti) -> None:
    lib, cupti = fake_cupti
    lib.fake_cupti_fail(b"cuptiActivityEnable", 0, CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)
    tracer = _core.KernelTracer(cupti)
    with pytest.raises(WattscopeError, match="NVreg_RestrictProfilingToAdminUsers") as info:
        tracer.start()
    assert info.value.code == CUPTI_ERROR_INSUFFICIENT_PRIVILEGES
    assert info.value.call == "cuptiActivityEnable"
    assert not tracer.running
    tracer.stop()  # nothing to stop: a no-op


def test_bad_options_rejected(fake_cupti) -> None:
    _, cupti = fake_cupti
    with pytest.raises(TypeError, match="unknown kernel tracer option"):
        _core.KernelTracer(cupti, buffer_size=1)
    with pytest.raises(ValueError, match="buffer_bytes"):
        _core.KernelTracer(cupti, buffer_bytes=16)


def test_missing_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    open_fake_cupti()
    with pytest.raises(WattscopeError, match="WATTSCOPE_CUPTI_PATH") as info:
        _core.Cupti("/nonexistent/libcupti.so.13", [])
    assert info.value.call == "dlopen"


def test_a_real_cupti_without_a_driver_is_refused_not_called() -> None:
    """CUDA 13.2's libcupti crashes in its first call when no CUDA driver loads; wattscope must refuse it first.
    Runs in a child so that a regression kills the child, not the test session."""
    import subprocess
    import sys

    code = (
        "import ctypes, sys\n"
        "try:\n"
        "    ctypes.CDLL('libcuda.so.1')\n"
        "    sys.exit(3)\n"
        "except OSError:\n"
        "    pass\n"
        "import glob, site\n"
        "found = [p for d in site.getsitepackages() for p in glob.glob(d + '/nvidia/*/lib/libcupti.so*')]\n"
        "if not found:\n"
        "    sys.exit(4)\n"
        "from wattscope import _core\n"
        "from wattscope.errors import WattscopeError\n"
        "try:\n"
        "    _core.Cupti(found[0], [])\n"
        "except WattscopeError as e:\n"
        "    assert 'CUDA driver' in str(e), e\n"
        "    sys.exit(0)\n"
        "sys.exit(5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if proc.returncode == 3:
        pytest.skip("a CUDA driver is present here")
    if proc.returncode == 4:
        pytest.skip("no real libcupti installed here")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
