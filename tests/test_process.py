"""Process-level robustness: exit with a meter running, fork while sampling, a library that will not load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import wattscope
from wattscope import PowerMeter
from wattscope.testing import fake_nvml_path


def _run(code: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WATTSCOPE_NVML_PATH": str(fake_nvml_path()), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def test_exit_with_a_meter_running_is_clean():
    p = _run("""
        import time, wattscope
        m = wattscope.PowerMeter(0)
        m.start()
        time.sleep(0.2)
        print("leaving")
    """)
    assert p.returncode == 0, p.stderr
    assert "leaving" in p.stdout
    assert "Traceback" not in p.stderr


def test_exit_from_a_thread_while_sampling_is_clean():
    p = _run("""
        import threading, time, sys, wattscope
        def work():
            with wattscope.PowerMeter(0):
                time.sleep(5)
        threading.Thread(target=work, daemon=True).start()
        time.sleep(0.3)
        sys.exit(3)
    """)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr


def test_sigint_mid_measurement_closes_the_window():
    p = _run("""
        import os, signal, threading, time, wattscope
        m = wattscope.PowerMeter(0)
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            with m:
                time.sleep(5)
        except KeyboardInterrupt:
            print("interrupted", m.running, round(m.result.duration_s, 1))
    """)
    assert p.returncode == 0, p.stderr
    assert "interrupted False 0.3" in p.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_sampling():
    p = _run("""
        import os, time, wattscope
        m = wattscope.PowerMeter(0)
        m.start()
        time.sleep(0.2)
        pid = os.fork()
        if pid == 0:
            # The child has no sampler thread of the parent's: it measures with a fresh one, and exits cleanly.
            with wattscope.PowerMeter(0) as c:
                time.sleep(0.2)
            ok = c.result.energy_j > 0 and c.result.coverage > 0.9
            try:
                m.stop(); m.result
                inherited = "no error"
            except wattscope.MeasurementError as e:
                inherited = "refused"
            print("child", ok, inherited, flush=True)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        m.stop()
        print("parent", os.waitstatus_to_exitcode(status), m.result.coverage, flush=True)
    """)
    assert p.returncode == 0, p.stderr
    assert "child True refused" in p.stdout
    assert "parent 0 1.0" in p.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_that_exits_normally_does_not_hang():
    # A DataLoader worker that never measures and leaves through the interpreter's normal exit path (atexit, GC).
    p = _run("""
        import os, sys, time, multiprocessing as mp, wattscope
        def worker(q):
            q.put(os.getpid())
        with wattscope.PowerMeter(0) as m:
            ctx = mp.get_context("fork")
            q = ctx.Queue()
            procs = [ctx.Process(target=worker, args=(q,)) for _ in range(4)]
            for pr in procs: pr.start()
            for pr in procs: pr.join(10)
            codes = [pr.exitcode for pr in procs]
            time.sleep(0.1)
        print("codes", codes, m.result.coverage)
    """)
    assert p.returncode == 0, p.stderr
    assert "codes [0, 0, 0, 0] 1.0" in p.stdout


def test_missing_library_is_a_typed_error_that_says_what_to_do(monkeypatch):
    from wattscope import _session

    monkeypatch.setenv("WATTSCOPE_NVML_PATH", "/nonexistent/libnvidia-ml.so.1")
    _session.reset()
    try:
        with pytest.raises(wattscope.NvmlNotFoundError) as info:
            PowerMeter().start()
        msg = str(info.value)
        assert "WATTSCOPE_NVML_PATH" in msg and "/nonexistent/libnvidia-ml.so.1" in msg and "doctor" in msg
        assert info.value.code == 12
    finally:
        monkeypatch.delenv("WATTSCOPE_NVML_PATH")
        _session.reset()


def test_init_failure_is_typed(fake):
    from wattscope import _session

    fake.fail_init(9)  # driver not loaded
    _session.reset()
    with pytest.raises(wattscope.NvmlNotFoundError, match="driver is not loaded"):
        PowerMeter().start()
    fake.fail_init(0)


def test_slow_energy_counter_stays_off_the_callers_path(fake):
    # The real counter costs ~4 ms a call; start/stop must not pay it.
    fake.set_delay_us("nvmlDeviceGetTotalEnergyConsumption", 20_000)
    m = PowerMeter(0, sync_cuda=False)
    with m:
        pass  # warm: resolve devices, start the thread
    t0 = time.perf_counter()
    for _ in range(50):
        with m:
            pass
    per_window_s = (time.perf_counter() - t0) / 50
    assert per_window_s < 0.005
    assert fake.call_count("nvmlDeviceGetTotalEnergyConsumption") >= 1
