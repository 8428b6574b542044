"""Several GPUs in one machine, on CPU: the fake NVML serves up to 16 GPUs through the real loader, sampler thread and
bindings, each with its own trace, sample period and ring; sweeps run their tiny models on the CPU while metering the
fake GPUs. What only real GPUs can show (power crosstalk between boards, NVML's cost per call with 8 GPUs, a sweep's
throughput on two GPUs) is measured by bench/multi_gpu_bench.py on a multi-GPU machine."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
from conftest import _ignore_torch_devices

import wattscope
from wattscope import PowerMeter, _session
from wattscope.cli import main
from wattscope.devices import resolve
from wattscope.sweep import runner
from wattscope.sweep.runner import SweepOptions, run_sweep, validate
from wattscope.sweep.store import SweepStore
from wattscope.testing import FakeNvml, fake_nvml_path

MS = 1_000_000
N_GPUS = 8
RING = 120  # the fake's driver ring, as on H100


def uuid(i: int) -> str:
    return f"GPU-fa4e0000-0000-0000-0000-0000000000{i:02x}"


class _FakeCuda:
    """torch.cuda as devices.py and PowerMeter see it: which GPUs this process's CUDA shows, by UUID (torch prints
    them without the "GPU-" prefix), and the synchronisations a meter asks for."""

    def __init__(self) -> None:
        self.uuids: list[str] | None = None  # None: CUDA not initialised
        self.synchronized: list[int] = []

    def is_initialized(self) -> bool:
        return self.uuids is not None

    def device_count(self) -> int:
        return len(self.uuids or ())

    def get_device_properties(self, index: int) -> types.SimpleNamespace:
        assert self.uuids is not None
        return types.SimpleNamespace(uuid=self.uuids[index])

    def synchronize(self, index: int) -> None:
        self.synchronized.append(index)


@pytest.fixture
def cuda(monkeypatch) -> _FakeCuda:
    """A stand-in torch whose CUDA is not initialised unless a test says so; the real torch (whose CUDA may be
    initialised on a GPU host) must not decide the CUDA order of the fake GPUs."""
    fake_cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda))
    return fake_cuda


@pytest.fixture
def fake8(monkeypatch, cuda):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    fake = FakeNvml.install(N_GPUS, linger_ns=500_000_000, energy_period_ns=100_000_000)
    yield fake
    _session.reset()
    fake.reset(1)


def _edge_bound_j(g, step_w: float) -> float:
    """The estimator assumes power uniform inside a sample's interval: at each edge it can be off by one sample period
    of the trace's largest step (the trace's, not the readings': a boxcar can read flat over a square wave)."""
    return 2 * g.sample_period_s * step_w


def _truth_j(fake: FakeNvml, dev: int, r, g) -> float:
    """The analytic energy the meter's estimate stands for. The fake is named H100, so the meter moves its stamps back
    by the H100 sensor's lag (``sensor_shift_ns``); the fake's samples have no lag, so what the meter integrated is the
    true signal over the window moved by that shift."""
    return fake.energy_j(dev, r.start_ns + g.sensor_shift_ns, r.stop_ns + g.sensor_shift_ns)


# -- 1. one sampler thread, eight GPUs -------------------------------------------------------------------------------


def test_eight_gpus_each_with_its_own_trace_integrate_exactly_and_lose_no_sample(fake8):
    # Sample periods of 4 to 7.5 ms put the 120-sample ring at 0.48 to 0.9 s (a loaded H100 at ~9 ms: ~1.1 s), so the
    # 2 s window spans 2 to 4 ring lengths: every GPU's ring must be drained several times, each time before it wraps.
    # 250 us per nvmlDeviceGetSamples call is what one costs on H100: one drain pass takes ~2 ms for eight GPUs.
    fake8.set_delay_us("nvmlDeviceGetSamples", 250)
    period_ns = [(4_000 + 500 * d) * 1000 for d in range(N_GPUS)]
    levels_w = [(50.0 + 10 * d, 180.0 + 45 * d) for d in range(N_GPUS)]
    for d in range(N_GPUS):
        fake8.set_sample_period_us(d, period_ns[d] // 1000)
        fake8.set_trace(d, [0.0, 0.021 + 0.009 * d], levels_w[d], repeat_period_s=0.07 + 0.013 * d)
    sampler = _session.current().sampler()
    overruns_before = sampler.stats()["overruns"]
    with PowerMeter("all") as m:
        time.sleep(2.0)
    r = m.result
    assert r.duration_s > 4 * RING * period_ns[0] / 1e9
    assert [g.cuda_index for g in r.gpus] == list(range(N_GPUS))
    assert [g.uuid for g in r.gpus] == [uuid(d) for d in range(N_GPUS)]
    for d, g in enumerate(r.gpus):
        # Each slot learnt its own GPU's spacing: the slots are not crossed.
        assert g.source == "samples" and g.sample_period_s == pytest.approx(period_ns[d] / 1e9)
        assert (g.gaps, g.coverage, g.errors) == (0, 1.0, ())
        snap = sampler.snapshot(d, r.start_ns, r.stop_ns)
        assert (snap["overruns"], snap["samples"]["dropped"], snap["lost"]) == (0, 0, False)
        # Nothing lost: the stream around the window is evenly spaced at the GPU's own period from end to end (to the
        # few ns by which the realtime offset, re-measured every second, moves the stamps converted after it).
        t = g.t_ns
        assert np.abs(np.diff(t) - period_ns[d]).max() < 10_000, d
        assert t[0] < r.start_ns and t[-1] > r.stop_ns
        assert len(t) == pytest.approx((t[-1] - t[0]) / period_ns[d] + 1)
        # Exact: each sample is the mean over the period before its stamp, so the stream sums to the analytic integral
        # (to the whole-mW rounding NVML imposes); one sample lost or counted twice would be off by >= 5e-4.
        stream_j = float(np.sum(g.power_w[1:])) * period_ns[d] / 1e9
        assert stream_j == pytest.approx(fake8.energy_j(d, int(t[0]), int(t[-1])), rel=1e-6)
        # The window's estimate: exact up to the edge bound, and far from any other GPU's energy.
        truth = _truth_j(fake8, d, r, g)
        bound_j = _edge_bound_j(g, levels_w[d][1] - levels_w[d][0])
        assert abs(g.energy_j - truth) <= bound_j + 1e-6 * truth, (d, g.energy_j, truth)
    # A crossed slot could not pass the bound above: neighbouring GPUs' energies differ by more than twice of it.
    energies = [g.energy_j for g in r.gpus]
    assert min(np.diff(energies)) > 2 * max(_edge_bound_j(g, hi - lo) for g, (lo, hi) in zip(r.gpus, levels_w,
                                                                                             strict=True))
    assert r.energy_j == pytest.approx(sum(energies), rel=1e-12)
    assert (r.gaps, r.coverage) == (0, 1.0)
    assert sampler.stats()["overruns"] == overruns_before


def test_a_ring_drained_too_late_is_reported_on_its_own_gpu_only(fake8):
    """The falsifying case of the test above: GPU 1's ring holds 120 ms of 1 ms samples and is drained every 250 ms,
    so it overruns at every drain; its neighbours, drained by the same passes, lose nothing."""
    fake8.set_sample_period_us(1, 1_000)
    for d in range(3):
        fake8.set_trace(d, [0.0, 0.03], [90.0 + 20 * d, 300.0], repeat_period_s=0.11)
    sampler = _session.current().sampler()
    with PowerMeter([0, 1, 2]) as m:
        time.sleep(0.6)
    r = m.result
    snaps = [sampler.snapshot(d, r.start_ns, r.stop_ns) for d in range(3)]
    assert snaps[1]["overruns"] >= 2 and r.gpus[1].gaps >= 2 and r.gpus[1].coverage < 0.7
    for d in (0, 2):
        assert (snaps[d]["overruns"], r.gpus[d].gaps, r.gpus[d].coverage) == (0, 0, 1.0)
    assert sampler.stats()["overruns"] == sum(s["overruns"] for s in snaps)
    assert r.gaps == r.gpus[1].gaps and r.coverage == r.gpus[1].coverage


# -- 2. isolation and the CUDA index of each GPU ---------------------------------------------------------------------


def _sleep_until(t_ns: int) -> None:
    time.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))


def test_load_on_one_gpu_does_not_show_on_the_idle_one_and_back(fake8):
    idle_w = (55.0, 85.0)
    origin_ns = time.monotonic_ns()
    high_w, low_w = (420.0, 390.0), (260.0, 240.0)
    # GPU 0 busy on [0.05, 0.47) s, GPU 1 busy on [0.55, 0.97) s: a 30 ms square wave between 420 and 260 W (GPU 0)
    # or 390 and 240 W (GPU 1), idle otherwise.
    for d, t0_s in enumerate((0.05, 0.55)):
        knots = [0.0] + [t0_s + 0.03 * k for k in range(15)]
        power = [idle_w[d]] + [high_w[d] if k % 2 == 0 else low_w[d] for k in range(14)] + [idle_w[d]]
        fake8.set_trace(d, knots, power, origin_mono_ns=origin_ns)
    phases = []
    # Windows 100 ms inside the busy spans: the idle GPU's readings, one period and the sensor shift beyond each
    # edge, then see idle power only.
    for busy, (a_s, b_s) in ((0, (0.15, 0.37)), (1, (0.65, 0.87))):
        _sleep_until(origin_ns + int(a_s * 1e9))
        with PowerMeter([0, 1]) as m:
            _sleep_until(origin_ns + int(b_s * 1e9))
        r = m.result
        late_ms = max((r.start_ns - origin_ns) / MS - a_s * 1e3, (r.stop_ns - origin_ns) / MS - b_s * 1e3)
        assert late_ms < 50, f"a window edge came {late_ms:.0f} ms late: the machine is too busy for this test"
        phases.append((busy, r))
    for busy, r in phases:
        idle = 1 - busy
        g_busy, g_idle = r.gpus[busy], r.gpus[idle]
        assert g_idle.energy_j == pytest.approx(idle_w[idle] * r.duration_s, rel=1e-6)
        assert g_idle.peak_power_w == pytest.approx(idle_w[idle], rel=1e-6)
        truth = _truth_j(fake8, busy, r, g_busy)
        assert abs(g_busy.energy_j - truth) <= _edge_bound_j(g_busy, high_w[busy] - low_w[busy]) + 1e-6 * truth
        assert g_busy.mean_power_w > 3 * idle_w[busy]
        assert r.energy_j == pytest.approx(g_busy.energy_j + g_idle.energy_j)


def test_one_thread_per_gpu_each_with_its_own_meter(fake8):
    """A program driving each GPU from its own thread, each measuring its GPU: the GPUs join the shared sampler one
    by one while it is already draining the others, and every window still integrates its own GPU's trace."""
    levels_w = [(70.0 + 20 * d, 350.0 - 30 * d) for d in range(4)]
    for d in range(4):
        fake8.set_trace(d, [0.0, 0.013 * (d + 1)], levels_w[d], repeat_period_s=0.05 + 0.02 * d)
    results = {}

    def work(d: int) -> None:
        time.sleep(0.08 * d)
        with PowerMeter(d) as m:
            time.sleep(0.3)
        results[d] = m.result

    threads = [threading.Thread(target=work, args=(d,)) for d in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(results) == [0, 1, 2, 3]
    assert _session.current().sampler().device_count() == 4
    for d, r in results.items():
        (g,) = r.gpus
        assert (g.nvml_index, g.gaps, g.coverage) == (d, 0, 1.0)
        truth = _truth_j(fake8, d, r, g)
        bound_j = _edge_bound_j(g, levels_w[d][1] - levels_w[d][0])
        assert abs(g.energy_j - truth) <= bound_j + 1e-6 * truth, (d, g.energy_j, truth)


def test_cuda_visible_devices_maps_cuda_indices_to_physical_gpus(fake8, monkeypatch):
    for d in range(N_GPUS):
        fake8.set_trace(d, [0.0], [100.0 + 10 * d])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with PowerMeter(0) as m:
        time.sleep(0.1)
    g = m.result.gpus[0]
    assert (g.cuda_index, g.nvml_index, g.uuid) == (0, 1, uuid(1))
    assert g.mean_power_w == pytest.approx(110.0, rel=1e-6)  # the second physical GPU's power, not the first's
    with pytest.raises(wattscope.DeviceNotFoundError, match="no CUDA device 1"):
        PowerMeter(1).start()
    everything = resolve(_session.current().nvml(), "all")
    assert [g.cuda_index for g in everything] == [None, 0] + [None] * (N_GPUS - 2)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with PowerMeter([0, 1]) as m:
        time.sleep(0.1)
    r = m.result
    assert [(g.cuda_index, g.nvml_index) for g in r.gpus] == [(0, 3), (1, 1)]
    assert [g.mean_power_w for g in r.gpus] == pytest.approx([130.0, 110.0], rel=1e-6)
    d = r.to_dict()
    assert (d["gpu0.uuid"], d["gpu1.uuid"]) == (uuid(3), uuid(1))


def test_torch_device_uuids_decide_the_cuda_index_and_the_synchronised_device(fake8, cuda, monkeypatch):
    for d in range(N_GPUS):
        fake8.set_trace(d, [0.0], [100.0 + 10 * d])
    # The process runs with CUDA_VISIBLE_DEVICES=1 and torch initialised CUDA there: torch shows one GPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    cuda.uuids = [uuid(1)[4:].upper()]
    with PowerMeter(0) as m:
        time.sleep(0.1)
    g = m.result.gpus[0]
    assert (g.cuda_index, g.nvml_index, g.mean_power_w) == (0, 1, pytest.approx(110.0, rel=1e-6))
    assert cuda.synchronized == [0, 0]  # both edges, on CUDA device 0 of this process

    # torch's order wins over the PCI order wattscope would assume from the environment (CUDA orders the fastest
    # GPU first unless CUDA_DEVICE_ORDER=PCI_BUS_ID).
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cuda.uuids = [uuid(2)[4:], uuid(0)[4:], uuid(1)[4:]]
    cuda.synchronized.clear()
    with PowerMeter(1) as m:
        time.sleep(0.1)
    g = m.result.gpus[0]
    assert (g.cuda_index, g.nvml_index, g.mean_power_w) == (1, 0, pytest.approx(100.0, rel=1e-6))
    assert cuda.synchronized == [1, 1]
    gpus = resolve(_session.current().nvml(), "all")
    assert [g.cuda_index for g in gpus] == [1, 2, 0] + [None] * (N_GPUS - 3)


# -- 3. the sweep over two GPUs, and shards in separate processes ----------------------------------------------------

IDLE_W = (60.0, 30.0)
WORKER_W = 100.0  # each worker's own copy of the fake serves its default trace
# Three units on two GPUs: both GPUs get one, so one of them gets two, one after the other.
SWEEP_MODELS = ("resnet18@224", "resnet50@224", "vit_base_patch16_224@224")
SWEEP_ARGS = ["--provider", "tiny", "--device", "cpu", "--models", ",".join(SWEEP_MODELS), "--batch-sizes", "1",
              "--target-ci", "0.5", "--max-trials", "3", "--idle-s", "0.3", "--warmup-s", "0.2", "--quiet"]


@pytest.fixture
def sweep2(monkeypatch, tmp_path):
    monkeypatch.setenv("WATTSCOPE_CACHE_DIR", str(tmp_path / "cache"))  # no sensor profile from the user's cache
    monkeypatch.setenv("WATTSCOPE_FAKE_NVML_DEVICES", "2")  # the workers' own copies of the fake
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _ignore_torch_devices(monkeypatch)
    fake = FakeNvml.install(2, linger_ns=500_000_000, energy_period_ns=100_000_000)
    for d, power_w in enumerate(IDLE_W):
        fake.set_trace(d, [0.0], [power_w])
    yield fake
    _session.reset()
    fake.reset(1)


def _keys(rows) -> list[tuple[str, str]]:
    return sorted((r.unit_key, r.config.key) for r in rows)


def _filled(row) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(row) if getattr(row, f.name) is not None)


def test_sweep_runs_one_worker_per_gpu_and_shards_merge_to_the_same_work(sweep2, tmp_path, monkeypatch):
    # Two shards as two Slurm array tasks would run them: separate processes, each given its own GPU through
    # CUDA_VISIBLE_DEVICES and asked for its CUDA device 0. They run while this process sweeps over both GPUs.
    env = dict(os.environ, WATTSCOPE_NVML_PATH=str(fake_nvml_path()))
    shard_dbs = [tmp_path / f"shard{i}.sqlite" for i in range(2)]
    shards = [
        subprocess.Popen([sys.executable, "-m", "wattscope.cli", "sweep", *SWEEP_ARGS, "--shard", f"{i}/2", "--gpus",
                          "0", "--db", str(shard_dbs[i])], env=env | {"CUDA_VISIBLE_DEVICES": str(i)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    jobs: list[tuple[str, str, float, float]] = []  # (GPU, unit, start, end) of each worker job
    jobs_lock = threading.Lock()
    real_run_job = runner.run_job

    def recording_run_job(job, **kw):
        t0 = time.monotonic()
        yield from real_run_job(job, **kw)
        with jobs_lock:
            jobs.append((job.settings.meter_device, job.unit_key, t0, time.monotonic()))

    monkeypatch.setattr(runner, "run_job", recording_run_job)
    options = SweepOptions(db_path=str(tmp_path / "two.sqlite"), provider="tiny", device="cpu", target_ci=0.5,
                           max_trials=3, idle_s=0.3, warmup_s=0.2, progress=False, models=SWEEP_MODELS,
                           batch_sizes=(1,), gpus=(0, 1))
    try:
        summary = run_sweep(options)
        outputs = [p.communicate(timeout=120) for p in shards]
    finally:
        for p in shards:
            p.kill()
            p.wait()
    planned = sorted(it.key for it in validate(options, check_gpus=False).items)
    assert len(planned) == len(SWEEP_MODELS)

    # One worker per GPU: each unit measured once, on one GPU; a GPU runs one job at a time; the two GPUs at once.
    assert (summary.planned, summary.measured, summary.failed, len(summary.run_ids)) == (3, 3, 0, 2)
    assert sorted(unit for _, unit, _, _ in jobs) == sorted(SWEEP_MODELS)
    by_gpu = {u: sorted((a, b) for g, _, a, b in jobs if g == u) for u in (uuid(0), uuid(1))}
    assert all(by_gpu.values()), by_gpu
    for spans in by_gpu.values():
        assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False))
    assert any(a0 < b1 and a1 < b0 for a0, b0 in by_gpu[uuid(0)] for a1, b1 in by_gpu[uuid(1)])
    with SweepStore(options.db_path) as store:
        two = store.results()
        assert not store.failures()
    assert _keys(two) == planned
    assert {r.gpu_uuid for r in two} == {uuid(0), uuid(1)}
    for r in two:
        assert r.idle_power_w == pytest.approx(IDLE_W[int(r.gpu_uuid[-2:], 16)], rel=1e-3)  # its own GPU's idle
        assert r.mean_power_w == pytest.approx(WORKER_W, rel=1e-3)

    # Shards: disjoint, together the whole work list, each on the GPU its CUDA_VISIBLE_DEVICES named.
    for i, (p, (out, err)) in enumerate(zip(shards, outputs, strict=True)):
        assert p.returncode == 0, err
        assert out.startswith(f"{len(planned[i::2])} measured, 0 failed"), out
    shard_rows = []
    for i, db in enumerate(shard_dbs):
        with SweepStore(db) as store:
            rows = store.results()
        assert {r.gpu_uuid for r in rows} == {uuid(i)}
        shard_rows.append(rows)
    assert not set(_keys(shard_rows[0])) & set(_keys(shard_rows[1]))
    merged = tmp_path / "merged.sqlite"
    assert main(["merge", str(merged), *map(str, shard_dbs)]) == 0
    with SweepStore(merged) as store:
        merged_rows = store.results()
    assert _keys(merged_rows) == planned == _keys(shard_rows[0] + shard_rows[1])

    # The two-GPU run's rows carry the same fields, filled the same way, as the single-GPU runs' rows.
    for r in two + merged_rows:
        assert _filled(r) == _filled(merged_rows[0]), r.unit_key
        assert (r.sensor_source, r.coverage, r.mean_power_w) == ("samples", pytest.approx(1.0),
                                                                 pytest.approx(WORKER_W, rel=1e-3))
        assert 2 <= r.n_trials <= 3
    with SweepStore(options.db_path) as a, SweepStore(merged) as b:
        header_two = a.export_csv(tmp_path / "two.csv").read_text().splitlines()[0]
        header_merged = b.export_csv(tmp_path / "merged.csv").read_text().splitlines()[0]
    assert header_two == header_merged
