"""The sweep's execution on CPU: tiny models in real worker processes, metered through the fake NVML.

The sweep's process programs its fake GPU to idle at 60 W; each worker loads its own copy of the fake, which serves
its default constant 100 W, so every row has a known power and a known energy above idle.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wattscope
from wattscope.cli import build_parser, main
from wattscope.sweep.catalog import UnknownModelError
from wattscope.sweep.command import options_from_args
from wattscope.sweep.measure import ci95_half_width, t975
from wattscope.sweep.runner import SweepOptions, SweepOptionsError, run_sweep, validate
from wattscope.sweep.store import SweepStore
from wattscope.sweep.worker import classify
from wattscope.testing import fake_nvml_path

IDLE_W = 60.0
WORKER_W = 100.0  # the fake's default trace, which each worker's own copy of the fake serves
MODELS = ("resnet50@224", "vit_base_patch16_224@224")
# Sensor window the protocol plans for the fake (an "H100": low-pass tau 11.5 ms, 20 ms samples) at a 50 % target.
MIN_WINDOW_S = 0.06


@pytest.fixture
def sweep_fake(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("WATTSCOPE_CACHE_DIR", str(tmp_path / "cache"))  # no sensor profile from the user's cache
    fake.set_trace(0, [0.0], [IDLE_W])
    return fake


def _options(tmp_path: Path, **kw) -> SweepOptions:
    base = dict(
        db_path=str(tmp_path / "sweep.sqlite"),
        provider="tiny",
        device="cpu",
        target_ci=0.5,
        max_trials=3,
        idle_s=0.3,
        warmup_s=0.2,
        progress=False,
        models=MODELS,
        batch_sizes=(1,),
    )
    return SweepOptions(**(base | kw))


def _keys(rows) -> list[tuple[str, str]]:
    return sorted((r.unit_key, r.config.key) for r in rows)


def test_sweep_writes_sane_rows_and_resumes_without_repeating(sweep_fake, tmp_path):
    first = run_sweep(_options(tmp_path))
    assert (first.planned, first.skipped, first.measured, first.failed) == (2, 0, 2, 0)

    second = run_sweep(_options(tmp_path, batch_sizes=(1, 2)))
    assert (second.planned, second.skipped, second.measured, second.failed) == (4, 2, 2, 0)
    assert not second.interrupted and 0 < second.measure_share < 1

    uuid = wattscope.list_gpus()[0].uuid
    with SweepStore(tmp_path / "sweep.sqlite") as store:
        rows, runs, idle = store.results(), store.runs(), store.idle_readings()
    expected = sorted((m, f"bs{b}-bf16-cl0-comp0-graph0-224") for m in MODELS for b in (1, 2))
    assert _keys(rows) == expected
    # The first run's rows are kept as they were: a resume measures only what is missing.
    assert {r.run_id for r in rows if r.config.batch_size == 1} == {runs[0].run_id}
    assert {r.run_id for r in rows if r.config.batch_size == 2} == {runs[1].run_id}
    assert [i.idle_power_w for i in idle] == pytest.approx([IDLE_W, IDLE_W], rel=1e-3)
    assert all(run.gpu_uuid == uuid and run.torch_version for run in runs)
    for r in rows:
        assert r.gpu_uuid == uuid and r.architecture == r.unit_key.split("@")[0] and r.img_size == 224
        assert r.mean_power_w == pytest.approx(WORKER_W, rel=1e-3)
        assert r.idle_power_w == pytest.approx(IDLE_W, rel=1e-3)
        assert r.energy_per_image_above_idle_j == pytest.approx(
            r.energy_per_image_j * (1 - IDLE_W / WORKER_W), rel=1e-3
        )
        assert r.latency_per_batch_ms == pytest.approx(1e3 * r.config.batch_size / r.images_per_s, rel=1e-9)
        assert 2 <= r.n_trials <= 3 and r.window_s >= MIN_WINDOW_S
        assert 0 <= r.energy_per_image_ci95_j < float("inf")
        assert r.sensor_source == "samples" and "H100" in r.sensor_profile
        assert r.peak_memory_bytes is None  # only measured on CUDA
        assert r.coverage == pytest.approx(1.0) and r.peak_power_w == pytest.approx(WORKER_W, rel=1e-3)
        assert r.sm_clock_mhz == pytest.approx(1980) and r.temperature_c == pytest.approx(45)
        assert r.warmup_s > 0 and r.measure_s > 0 and r.warmup_s + r.measure_s <= r.wall_s + 1e-6
        assert isinstance(r.warmup_converged, bool)  # recorded (schema 2), whichever way warm-up ended

    # Nothing left: a rerun measures nothing, not even idle power.
    third = run_sweep(_options(tmp_path, batch_sizes=(1, 2)))
    assert (third.skipped, third.measured, third.run_ids) == (4, 0, ())


def test_resume_skips_what_another_board_of_the_same_model_measured_unless_per_board(sweep_fake, tmp_path):
    run_sweep(_options(tmp_path))
    db = tmp_path / "sweep.sqlite"
    with sqlite3.connect(db) as conn:  # as if measured on another node's H100
        conn.execute("UPDATE results SET gpu_uuid = 'GPU-00000000-0000-0000-0000-0000000000bb'")
    again = run_sweep(_options(tmp_path))
    assert (again.planned, again.skipped, again.measured) == (2, 2, 0)
    board = run_sweep(_options(tmp_path, per_board=True))
    assert (board.planned, board.skipped, board.measured) == (2, 0, 2)
    with SweepStore(db) as store:
        assert len({r.gpu_uuid for r in store.results()}) == 2


def test_failures_become_rows_and_the_sweep_goes_on(sweep_fake, tmp_path):
    models = ("tiny_compile_error", "tiny_crash", "tiny_hang", "tiny_oom", "vit_base_patch16_224@224")
    summary = run_sweep(_options(tmp_path, models=models, timeout_s=3.0))
    assert summary.failures_by_kind == {"compile": 1, "crash": 1, "timeout": 1, "oom": 1}
    assert summary.measured == 1  # measured after every kind of failure
    with SweepStore(tmp_path / "sweep.sqlite") as store:
        failures = {f.unit_key: f for f in store.failures()}
        results = store.results()
    assert {k: f.kind for k, f in failures.items()} == {
        "tiny_compile_error@224": "compile",
        "tiny_crash@224": "crash",
        "tiny_hang@224": "timeout",
        "tiny_oom@224": "oom",
    }
    assert "SIGKILL" in failures["tiny_crash@224"].message
    assert "timeout (3 s)" in failures["tiny_hang@224"].message
    assert failures["tiny_hang@224"].wall_s >= 3.0
    assert "OutOfMemoryError" in failures["tiny_oom@224"].message
    assert [r.unit_key for r in results] == ["vit_base_patch16_224@224"]
    # Failures count as done unless retried.
    again = run_sweep(_options(tmp_path, models=models, timeout_s=3.0))
    assert (again.skipped, again.measured, again.failed) == (5, 0, 0)


def test_two_gpus_share_the_units(sweep_fake, tmp_path, monkeypatch):
    from wattscope.testing import FakeNvml

    monkeypatch.setenv("WATTSCOPE_FAKE_NVML_DEVICES", "2")  # the workers' own copies of the fake
    fake = FakeNvml.install(2, linger_ns=500_000_000, energy_period_ns=100_000_000)
    fake.set_trace(0, [0.0], [IDLE_W])
    fake.set_trace(1, [0.0], [IDLE_W / 2])
    summary = run_sweep(_options(tmp_path, gpus=(0, 1)))
    assert (summary.measured, summary.failed, len(summary.run_ids)) == (2, 0, 2)
    uuids = {g.uuid: g for g in wattscope.list_gpus()}
    with SweepStore(tmp_path / "sweep.sqlite") as store:
        rows, runs = store.results(), store.runs()
    assert {r.gpu_uuid for r in rows} == set(uuids) == {run.gpu_uuid for run in runs}
    for r in rows:  # each row carries its own GPU's idle baseline
        expected_idle_w = IDLE_W if uuids[r.gpu_uuid].cuda_index == 0 else IDLE_W / 2
        assert r.idle_power_w == pytest.approx(expected_idle_w, rel=1e-3)
        assert r.mean_power_w == pytest.approx(WORKER_W, rel=1e-3)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _result_count(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not created yet
        return 0
    finally:
        conn.close()


def test_kill_9_mid_sweep_then_rerun_loses_and_duplicates_nothing(tmp_path):
    db = tmp_path / "sweep.sqlite"
    env = dict(os.environ, WATTSCOPE_NVML_PATH=str(fake_nvml_path()), WATTSCOPE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable,
        "-m",
        "wattscope.cli",
        "sweep",
        "--provider",
        "tiny",
        "--device",
        "cpu",
        "--models",
        ",".join(MODELS),
        "--batch-sizes",
        "1,2",
        "--target-ci",
        "0.5",
        "--max-trials",
        "3",
        "--idle-s",
        "0.3",
        "--warmup-s",
        "0.2",
        "--db",
        str(db),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _result_count(db) < 1:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no result within 60 s"
            time.sleep(0.02)
        workers = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = _result_count(db)
    assert 1 <= before < 4
    assert workers, "the sweep had no worker process to leave behind"
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers), "workers outlived the killed sweep"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith(f"{4 - before} measured, 0 failed, {before} already in")
    with SweepStore(db) as store:
        rows = store.results()
    assert _keys(rows) == sorted((m, f"bs{b}-bf16-cl0-comp0-graph0-224") for m in MODELS for b in (1, 2))


def test_validate_fails_fast_with_clear_messages(sweep_fake, tmp_path):
    db = tmp_path / "sweep.sqlite"
    with pytest.raises(UnknownModelError, match="resnet50"):
        validate(_options(tmp_path, models=("resnet5O",)))
    with pytest.raises(SweepOptionsError, match="batch size 0"):
        validate(_options(tmp_path, batch_sizes=(1, 0)))
    with pytest.raises(SweepOptionsError, match="unknown precision 'fp8'"):
        validate(_options(tmp_path, precisions=("bf16", "fp8")))
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("")
    with pytest.raises(SweepOptionsError, match="is a file, not a folder"):
        validate(_options(tmp_path, db_path=str(not_a_folder / "sub" / "sweep.sqlite")))
    with pytest.raises(SweepOptionsError, match="is a directory"):
        validate(_options(tmp_path, db_path=str(tmp_path)))
    for shard in ("3/2", "a/b", "1", "-1/2"):
        with pytest.raises(SweepOptionsError, match="expected i/n"):
            validate(_options(tmp_path, shard=shard))
    with pytest.raises(SweepOptionsError, match=r"no CUDA device 5 .*GPUs:\n  cuda:0  Fake NVIDIA H100"):
        validate(_options(tmp_path, gpus=(5,)))
    with pytest.raises(SweepOptionsError, match="CUDA graphs cannot run on the CPU"):
        validate(_options(tmp_path, cuda_graphs="both"))
    with pytest.raises(SweepOptionsError, match="--provider 'keras'"):
        validate(_options(tmp_path, provider="keras"))
    with pytest.raises(SweepOptionsError, match=r"--max-trials \(1\)"):
        validate(_options(tmp_path, max_trials=1))
    assert not db.exists()  # nothing was created by a failed validation
    plan = validate(_options(tmp_path, batch_sizes=(1, 8), precisions=("fp32", "bf16"), channels_last="both"))
    assert len(plan.items) == plan.total_items == 2 * 2 * 2 * 2 and not db.exists()


def test_shards_cover_the_work_list_exactly_once(tmp_path):
    opts = _options(tmp_path, models=("resnet*",), batch_sizes=(1, 32), precisions=("fp32", "bf16"))
    full = [it.key for it in validate(opts, check_gpus=False).items]
    assert len(full) == len(set(full)) > 50 and full == sorted(full)
    for n in (2, 3, 7):
        shards = [
            [it.key for it in validate(dataclasses.replace(opts, shard=f"{i}/{n}"), check_gpus=False).items]
            for i in range(n)
        ]
        assert sorted(k for s in shards for k in s) == full
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert shards[1] == [
            it.key for it in validate(dataclasses.replace(opts, shard=f"1/{n}"), check_gpus=False).items
        ]


def test_img_size_moves_units_and_max_units_cuts(tmp_path):
    plan = validate(
        _options(tmp_path, models=("vit_base_patch16_224@224", "resnet50@224"), img_size=256, max_units=1),
        check_gpus=False,
    )
    assert [(it.unit.key, it.config.img_size) for it in plan.items] == [("resnet50@256", 256)]


def test_cli_parses_into_options():
    args = build_parser().parse_args(
        [
            "sweep",
            "--models",
            "resnet50,vit*",
            "--models",
            "convnext_tiny",
            "--families",
            "vit",
            "--batch-sizes",
            "1,64,256",
            "--precisions",
            "fp32,bf16",
            "--gpus",
            "0,1",
            "--shard",
            "2/8",
            "--compile",
            "both",
            "--max-trials",
            "2",
            "--db",
            "out.sqlite",
            "--provider",
            "tiny",
            "--device",
            "cpu",
            "--img-size",
            "256",
        ]
    )
    o = options_from_args(args)
    assert o.models == ("resnet50", "vit*", "convnext_tiny") and o.families == ("vit",)
    assert o.batch_sizes == (1, 64, 256) and o.precisions == ("fp32", "bf16") and o.gpus == (0, 1)
    assert (o.shard, o.compile, o.cuda_graphs, o.db_path, o.img_size) == ("2/8", "both", "off", "out.sqlite", 256)
    assert (o.min_trials, o.max_trials) == (2, 2)
    assert args.run.__module__ == "wattscope.sweep.command"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--batch-sizes", "1,x"])


def test_cli_reports_bad_options_and_dry_runs(tmp_path, capsys):
    db = str(tmp_path / "s.sqlite")
    assert main(["sweep", "--provider", "tiny", "--device", "cpu", "--models", "nosuchnet", "--db", db]) == 2
    assert "wattscope sweep: error: unknown model 'nosuchnet'" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--provider",
                "tiny",
                "--device",
                "cpu",
                "--models",
                ",".join(MODELS),
                "--batch-sizes",
                "1,2",
                "--db",
                db,
                "--dry-run",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{m}\tbs{b}-bf16-cl0-comp0-graph0-224" for m in MODELS for b in (1, 2)]
    assert "4 to measure" in err and not Path(db).exists()


def test_cli_merge_refuses_mixed_schema_versions_and_export_writes_csv(tmp_path, capsys):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    for p in (a, b):
        SweepStore(p).close()
    assert main(["merge", str(tmp_path / "all.sqlite"), str(a), str(b)]) == 0
    assert main(["export", str(tmp_path / "all.sqlite"), "--csv", str(tmp_path / "all.csv")]) == 0
    assert (tmp_path / "all.csv").read_text().startswith("run_id,unit_key,")
    with sqlite3.connect(b) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "all2.sqlite"), str(a), str(b)]) == 2
    assert "version 999" in capsys.readouterr().err
    assert main(["export", str(a)]) == 2


def test_failure_classification_and_confidence_interval():
    import torch
    from torch._dynamo.exc import InternalTorchDynamoError

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as inner:
            raise RuntimeError("while running the model") from inner
    except RuntimeError as e:
        assert classify(e) == "oom"
    assert classify(InternalTorchDynamoError("x")) == "compile"
    assert classify(ValueError("x")) == "error"
    assert t975(1) == pytest.approx(12.706) and t975(200) == pytest.approx(1.972, abs=1e-3)
    assert ci95_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3**0.5)
    assert ci95_half_width([1.0]) == float("inf")


def test_a_first_call_longer_than_the_cap_still_leaves_a_full_warm_up():
    # torch.compile compiles in the first call, often for longer than the 10 s cap: the cap counts from after it,
    # or every compiled configuration would get one timing block and never be found steady.
    from wattscope.sweep.measure import MeasureSettings, warm_up

    calls = []

    def step() -> None:
        calls.append(None)
        time.sleep(0.3 if len(calls) == 1 else 0.002)

    settings = MeasureSettings(device="cpu", meter_device=0, idle_power_w=0.0, window_s=0.1, offsets_s=(0.0,),
                               warmup_cap_s=0.2, warmup_block_s=0.01)
    warm = warm_up(step, lambda: None, settings)
    assert warm.converged and warm.blocks >= 5


def test_warm_up_settles_on_stable_or_merely_noisy_timings_but_not_on_a_trend():
    from wattscope.sweep.measure import _steady

    assert _steady([1.0, 1.01, 0.99, 1.0, 1.005], 0.02)
    noisy = [1.0, 1.2, 0.9, 1.1, 0.8, 1.05, 1.15, 0.85, 1.0, 0.95]  # CV ~13 %, no drift
    assert not _steady(noisy[:5], 0.02) and _steady(noisy, 0.02)
    falling = [2.0 - 0.1 * i for i in range(10)]  # still speeding up
    assert not _steady(falling, 0.02)


@pytest.mark.gpu
def test_timm_models_build_at_other_sizes_and_run_on_the_gpu():
    import torch

    from wattscope.sweep.providers import get_provider

    provider = get_provider("timm")
    assert provider.available() is None and provider.versions()["timm"]
    assert provider.unknown(["resnet18", "no_such_net"]) == ["no_such_net"]
    for arch, size in (("resnet18", 224), ("vit_tiny_patch16_224", 256)):
        model = provider.build(arch, size, pretrained=False).cuda().eval()
        with torch.inference_mode():
            out = model(torch.randn(2, 3, size, size, device="cuda"))
        assert out.shape == (2, 1000)


@pytest.mark.gpu
def test_sweep_on_the_gpu_with_cuda_graphs(tmp_path, monkeypatch):
    from wattscope import _session

    monkeypatch.delenv("WATTSCOPE_NVML_PATH", raising=False)
    _session.reset()
    summary = run_sweep(
        SweepOptions(
            db_path=str(tmp_path / "gpu.sqlite"),
            models=("resnet18@224",),
            batch_sizes=(32,),
            cuda_graphs="both",
            target_ci=0.05,
            progress=False,
        )
    )
    assert (summary.measured, summary.failed) == (2, 0)
    with SweepStore(tmp_path / "gpu.sqlite") as store:
        rows = store.results()
    for r in rows:
        assert r.peak_memory_bytes > 0 and r.mean_power_w > r.idle_power_w > 0
        assert r.energy_per_image_above_idle_j > 0 and r.images_per_s > 100
    _session.reset()
