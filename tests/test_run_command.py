"""`wattscope run -- <command>` against the fake NVML (and the fake CUPTI for --kernels): real child processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from wattscope import cli
from wattscope.embed import child_tracing
from wattscope.embed.runner import run_command
from wattscope.testing import fake_nvml_path

MS = 1_000_000


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_exit_status_energy_and_results_file(fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake.set_trace(0, [0.0], [200.0])
    out = tmp_path / "run.json"
    rc = cli.main(["run", "--interval-s", "0.1", "-o", str(out), "--rapl-root", str(tmp_path / "none"), "--",
                   *_py("import time; time.sleep(0.3); raise SystemExit(3)")])
    assert rc == 3
    err = capsys.readouterr().err
    assert "exited with 3" in err and "whole-device energy" in err and "CPU (RAPL): unavailable" in err
    doc = json.loads(out.read_text())
    assert doc["format"] == "wattscope.results/1" and doc["exit_code"] == 3
    assert "every process using the measured GPUs" in doc["scope"]
    (trials,) = doc["regions"].values()
    (trial,) = trials
    assert {"name", "start_ns", "stop_ns", "duration_s", "energy_j", "uncertainty_j", "mean_power_w", "peak_power_w",
            "coverage", "gpu0.energy_j", "gpu0.uncertainty_j", "gpu0.uuid", "cpu.energy_j", "exit_code"} <= set(trial)
    # The window spans the child's whole life (interpreter start-up included), at 200 W throughout.
    assert trial["duration_s"] >= 0.3
    assert trial["energy_j"] == pytest.approx(200.0 * trial["duration_s"], rel=1e-6)
    assert trial["gpu0.source"] == "samples" and trial["exit_code"] == 3
    assert trial["cpu.energy_j"] is None and "does not exist" in trial["cpu.reason"]
    intervals = doc["runs"][0]["intervals"]
    assert len(intervals) == int(np.ceil(trial["duration_s"] / 0.1 - 1e-9))
    assert all(iv["duration_s"] == pytest.approx(0.1) for iv in intervals[:-1])
    assert sum(iv["energy_j"] for iv in intervals) == pytest.approx(trial["energy_j"], rel=1e-9)
    assert intervals[0]["start_ns"] == trial["start_ns"] and intervals[-1]["stop_ns"] == trial["stop_ns"]


def test_intervals_add_up_on_a_varying_trace(fake, tmp_path: Path) -> None:
    fake.set_trace(0, [0.0, 0.05, 0.11], [100.0, 400.0, 250.0], repeat_period_s=0.17)
    r = run_command(_py("import time; time.sleep(0.4)"), interval_s=0.07, cpu=False)
    assert r.exit_code == 0 and r.cpu is None
    m = r.measurement
    assert sum(w.energy_j for w in r.intervals) == pytest.approx(m.energy_j, rel=1e-9)
    # Each interval is the integral of the true trace over it, within its stated uncertainty (and a little slack).
    for w in r.intervals[1:-1]:
        truth = fake.energy_j(0, w.start_ns, w.stop_ns)
        assert w.energy_j == pytest.approx(truth, abs=3 * w.uncertainty_j + 0.05 * truth)
    assert m.energy_j == pytest.approx(fake.energy_j(0, m.start_ns, m.stop_ns), rel=0.02)


def test_csv_output_and_repeat(fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake.set_trace(0, [0.0], [120.0])
    out = tmp_path / "run.csv"
    assert cli.main(["run", "--repeat", "3", "--no-cpu", "--name", "nap", "-o", str(out), "--",
                     *_py("import time; time.sleep(0.05)")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert all(r["name"] == "nap" and float(r["mean_power_w"]) == pytest.approx(120.0) for r in rows)
    assert "3 trials" in capsys.readouterr().err
    # With intervals, the CSV has one row per interval instead.
    assert cli.main(["run", "--no-cpu", "-q", "--interval-s", "0.02", "-o", str(out), "--",
                     *_py("import time; time.sleep(0.05)")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) >= 3 and rows[0]["interval"] == "0" and "gpu0.energy_j" in rows[0]
    assert sum(float(r["energy_j"]) for r in rows) == pytest.approx(120.0 * sum(float(r["duration_s"]) for r in rows))
    # Repeats stop at the first failing run and pass its status on.
    assert cli.main(["run", "--repeat", "4", "--no-cpu", "-q", "-o", str(tmp_path / "f.json"), "--",
                     *_py("raise SystemExit(5)")]) == 5
    (trials,) = json.loads((tmp_path / "f.json").read_text())["regions"].values()
    assert len(trials) == 1


def test_commands_that_cannot_run(fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--", "wattscope-no-such-command"]) == 127
    assert "command not found" in capsys.readouterr().err
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    assert cli.main(["run", "--", str(script)]) == 126
    script.chmod(0o755)
    script.write_text("exit 0\n")  # executable, but no #! line: exec() refuses it (ENOEXEC), a shell would not
    assert cli.main(["run", "--", str(script)]) == 126
    assert "cannot execute: Exec format error" in capsys.readouterr().err
    assert cli.main(["run"]) == 2
    assert cli.main(["run", "--"]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "-o", "out.txt", "--", "true"])
    assert e.value.code == 2
    marker = tmp_path / "ran"
    # An output directory that does not exist is refused before the command runs, not after.
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "-o", str(tmp_path / "no" / "run.json"), "--", "touch", str(marker)])
    assert e.value.code == 2 and not marker.exists()
    assert "does not exist" in capsys.readouterr().err
    # wattscope's own failure (a GPU that does not exist) is 125, and the command does not run.
    assert cli.main(["run", "--devices", "7", "--", "touch", str(marker)]) == 125
    assert not marker.exists()
    assert cli.main(["run", "--devices", "7", "--", "true"]) == 125


def test_signal_killed_child_gives_128_plus_n(fake, tmp_path: Path) -> None:
    fake.set_trace(0, [0.0], [80.0])
    r = run_command(_py("import os, signal; os.kill(os.getpid(), signal.SIGTERM)"), cpu=False)
    assert r.exit_code == 128 + signal.SIGTERM
    assert r.measurement.energy_j == pytest.approx(80.0 * r.measurement.duration_s, rel=1e-6)
    # Through the command line: the status a shell would report, and the measurement is still written.
    out = tmp_path / "killed.json"
    assert cli.main(["run", "--no-cpu", "-q", "-o", str(out), "--", "sh", "-c", "kill -KILL $$"]) == 128 + 9
    doc = json.loads(out.read_text())
    assert doc["exit_code"] == 137 and doc["runs"][0]["signals_forwarded"] == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_and_the_measurement_written(tmp_path: Path, sig: signal.Signals) -> None:
    ready = tmp_path / "ready"
    out = tmp_path / "run.json"
    child = f"""
        import pathlib, signal, sys, time
        def handler(signum, frame):
            print("child got", signal.Signals(signum).name, flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(30)
    """
    env = {**os.environ, "WATTSCOPE_NVML_PATH": str(fake_nvml_path())}
    parent = subprocess.Popen([sys.executable, "-m", "wattscope.cli", "run", "--no-cpu", "-o", str(out), "--",
                               *_py(child)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline and parent.poll() is None, parent.communicate()
        time.sleep(0.02)
    parent.send_signal(sig)
    stdout, stderr = parent.communicate(timeout=20)
    assert parent.returncode == 7, stderr
    assert f"child got {sig.name}" in stdout
    assert f"signals: {sig.name}" in stderr
    doc = json.loads(out.read_text())
    assert doc["exit_code"] == 7 and doc["runs"][0]["signals_forwarded"] == [sig.name]
    (trials,) = doc["regions"].values()
    assert trials[0]["energy_j"] > 0 and trials[0]["coverage"] > 0.9


def test_cpu_energy_beside_the_gpus(fake, tmp_path: Path) -> None:
    fake.set_trace(0, [0.0], [100.0])
    zone = tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text("1000000\n")
    # The child stands in for the CPU: it advances the package counter by 7.5 J.
    r = run_command(_py(f"import pathlib; pathlib.Path({str(zone / 'energy_uj')!r}).write_text('8500000')"),
                    rapl_root=tmp_path / "powercap")
    assert r.cpu is not None and r.cpu.available
    assert r.cpu.energy_j == pytest.approx(7.5)
    trial = r.to_trial()
    assert trial["cpu.package-0.energy_j"] == pytest.approx(7.5) and trial["energy_j"] > 0


_KERNEL_CHILD = """
    import ctypes, os, time
    lib = ctypes.CDLL(os.environ["WATTSCOPE_CUPTI_PATH"])
    lib.fake_cupti_inject.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_char_p,
                                      ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    origin = int(os.environ["TRACE_ORIGIN_NS"])
    ms = 1_000_000
    # Wait until three periods of the 100 W / 400 W square wave have passed, then report their kernels.
    while time.monotonic_ns() < origin + 650 * ms:
        time.sleep(0.01)
    for k in range(3):
        base = origin + 200 * ms * k
        assert lib.fake_cupti_inject(10, 0, 7, b"cold", base + 20 * ms, base + 80 * ms, 1) == 1
        assert lib.fake_cupti_inject(10, 0, 7, b"hot", base + 100 * ms, base + 200 * ms, 2) == 1
    assert lib.fake_cupti_inject(10, 1, 7, b"other_gpu", base, base + 100 * ms, 3) == 1
"""


def test_kernels_of_a_python_child_are_attributed(fake, cupti, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    origin_ns = time.monotonic_ns()
    fake.set_trace(0, [0.0, 0.1], [100.0, 400.0], repeat_period_s=0.2, origin_mono_ns=origin_ns)
    monkeypatch.setenv("TRACE_ORIGIN_NS", str(origin_ns))
    # A sitecustomize of the user's own must still run: ours imports it after starting the tracer.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    marker = tmp_path / "theirs.ran"
    (theirs / "sitecustomize.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.setenv("PYTHONPATH", str(theirs))
    r = run_command(_py(_KERNEL_CHILD), kernels=True, cpu=False)
    assert r.exit_code == 0
    assert marker.exists()
    k = r.kernels
    assert k is not None and k.processes == 1
    rows = {row.name: row for row in k.rows["cuda:0"]}
    assert rows["hot"].calls == 3 and rows["cold"].calls == 3
    assert "other_gpu" not in rows  # GPU 1 is not measured
    assert rows["hot"].mean_power_w > 300 and rows["cold"].mean_power_w < 200
    assert sum(row.energy_j for row in k.rows["cuda:0"]) == pytest.approx(r.measurement.energy_j, rel=1e-9)
    assert any("matched by ordinal" in n for n in k.notes)  # no torch CUDA in the child: ordinals, said so
    assert not list(Path(child_tracing.tempfile.gettempdir()).glob("wattscope-kernels-*/*.npz"))  # cleaned up


def test_kernels_of_a_non_python_command_say_energy_only(fake, cupti, capsys: pytest.CaptureFixture[str]) -> None:
    fake.set_trace(0, [0.0], [90.0])
    assert cli.main(["run", "--kernels", "--no-cpu", "--", "sleep", "0.05"]) == 0
    err = capsys.readouterr().err
    assert "no Python process started under the command" in err and "energy only" in err


def test_a_python_child_with_no_gpu_work(fake, cupti) -> None:
    """Traced, it launches no kernel: the whole window's energy is the GPU's idle draw, and nothing is invented."""
    fake.set_trace(0, [0.0], [90.0])
    r = run_command(_py("import time; time.sleep(0.1)"), kernels=True, cpu=False)
    assert r.exit_code == 0
    m = r.measurement
    assert m.energy_j == pytest.approx(90.0 * m.duration_s, rel=1e-6)
    assert r.kernels is not None and r.kernels.processes == 1
    rows = {row.name: row for row in r.kernels.rows["cuda:0"]}
    assert set(rows) <= {"[idle]", "[unattributed]"}
    assert rows["[idle]"].energy_j == pytest.approx(m.energy_j, rel=1e-6)


def test_kernel_tracing_that_cannot_start_is_reported(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.set_trace(0, [0.0], [90.0])
    monkeypatch.setenv("WATTSCOPE_CUPTI_PATH", "/nonexistent/libcupti.so.13")
    r = run_command(_py("print('the program still runs')"), kernels=True, cpu=False)
    assert r.exit_code == 0 and r.kernels is not None and r.kernels.processes == 0
    assert any("kernel tracing did not start" in n for n in r.kernels.notes)


def test_child_records_are_matched_to_the_parent_gpus_by_uuid(tmp_path: Path) -> None:
    """The merge: a child whose torch knew the UUIDs (its CUDA ordinals differ from the parent's)."""
    with child_tracing.ChildTracing() as tracing:
        meta = {"pid": 1, "executable": "python", "argv": ["x"], "uuids": ["gpu-b", "gpu-a"], "dropped": 2,
                "failures": []}
        np.savez(tracing.directory / "1.npz", start_ns=np.array([30, 10, 20]), end_ns=np.array([40, 15, 25]),
                 name=np.array(["k1", "k0", "k2"]), stream=np.array([1, 1, 1]), device=np.array([0, 1, 5]),
                 kind=np.array(["kernel"] * 3), meta=np.array(json.dumps(meta)))
        found = tracing.collect({"gpu-a": 0, "gpu-b": 3})
        directory = tracing.directory
    assert not directory.exists()
    t = found.capture.timeline
    assert list(t.name) == ["k0", "k2", "k1"]  # merged in time order
    assert list(t.device) == [0, -1, 3]  # child 1 -> gpu-a -> parent 0; child 0 -> gpu-b -> 3; 5 is unknown
    assert t.dropped == 2 and found.processes == 1 and found.notes == ()


def test_a_signal_between_trials_keeps_the_finished_trials(fake, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while no command runs (the summary of trial 1): the repeats stop, trial 1 is written, exit 143."""
    from wattscope.embed import command as command_module

    fake.set_trace(0, [0.0], [50.0])
    summary = command_module._summary

    def summary_then_sigterm(r, trial):  # noqa: ANN001, ANN202
        os.kill(os.getpid(), signal.SIGTERM)
        return summary(r, trial)

    def not_handled(signum, frame):  # noqa: ANN001, ANN202
        raise AssertionError("SIGTERM reached the previous handler: wattscope did not hold it")

    monkeypatch.setattr(command_module, "_summary", summary_then_sigterm)
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        out = tmp_path / "run.json"
        code = cli.main(["run", "--no-cpu", "--repeat", "3", "-o", str(out), "--", *_py("pass")])
        assert signal.getsignal(signal.SIGTERM) is not_handled  # restored afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    (trials,) = json.loads(out.read_text())["regions"].values()
    assert len(trials) == 1 and trials[0]["exit_code"] == 0 and trials[0]["energy_j"] > 0


def test_a_terminal_signal_not_sent_is_not_logged(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the terminal's foreground, SIGINT is left to the terminal: the child is not sent it, and the log says so."""
    from wattscope.embed import runner

    fake.set_trace(0, [0.0], [50.0])
    monkeypatch.setattr(runner, "_terminal_delivers_to_child", lambda: True)
    ready = tmp_path / "ready"
    child = f"""
        import pathlib, signal, sys, time
        signal.signal(signal.SIGINT, lambda *a: sys.exit(9))
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(0.5)
    """

    def interrupt_when_ready() -> None:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # interrupts the wait, as a kill would

    sender = threading.Thread(target=interrupt_when_ready)
    sender.start()
    r = run_command(_py(child), cpu=False)
    sender.join()
    assert r.exit_code == 0 and r.signals_forwarded == ()


def test_a_failing_kernel_report_keeps_the_energy_and_exit_status(fake, cupti, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.set_trace(0, [0.0], [90.0])

    def broken(self, by_uuid):  # noqa: ANN001, ANN202
        raise json.JSONDecodeError("Expecting value", "", 0)

    monkeypatch.setattr(child_tracing.ChildTracing, "collect", broken)
    r = run_command(_py("raise SystemExit(3)"), kernels=True, cpu=False)
    assert r.exit_code == 3 and r.measurement.energy_j > 0
    assert r.kernels is not None and r.kernels.rows == {}
    assert r.kernels.notes == ("the kernel report failed (JSONDecodeError: Expecting value: line 1 column 1 (char 0)); "
                               "energy only",)


def test_at_exit_only_devices_with_a_context_are_synchronised() -> None:
    """Under torchrun each process uses one GPU: synchronising the others would create contexts on them (and
    raise on an EXCLUSIVE_PROCESS GPU held by another rank, losing the records)."""
    synced: list[int] = []

    def synchronize(i: int) -> None:
        if i == 3:
            raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")
        synced.append(i)

    cuda = types.SimpleNamespace(is_initialized=lambda: True, synchronize=synchronize, current_device=lambda: 2)
    torch = types.SimpleNamespace(cuda=cuda, _C=types.SimpleNamespace(_cuda_hasPrimaryContext=lambda i: i in (1, 3)))
    child_tracing._synchronize_used_devices(torch, 8)
    assert synced == [1]  # 3 has a context too but raised: skipped, no exception
    del torch._C._cuda_hasPrimaryContext  # an older torch: the current device only
    child_tracing._synchronize_used_devices(torch, 8)
    assert synced == [1, 2]
    cuda.is_initialized = lambda: False
    child_tracing._synchronize_used_devices(torch, 8)
    assert synced == [1, 2]
