"""Several GPUs in one machine: isolation and sweep throughput on real GPUs; the sampler's drain timing on fake ones.

    python bench/multi_gpu_bench.py [--gpus 0,1] [--isolation-s 10] [--skip-isolation] [--skip-sweep] [--shards]
        [--out-dir DIR] [-- SWEEP ARGS]
    python bench/multi_gpu_bench.py --fake [--counts 1,2,4,8] [--seconds 5]

Real GPUs (torch with CUDA and at least two GPUs):

1. Isolation: both GPUs idle for a baseline, then a bf16 GEMM loop on the first while the second idles, then the
   reverse, each window measured by one PowerMeter over both. The idle GPU's mean power must stay at its baseline
   (PASS within max(3 W, 3 %)); the loaded one must read well above its own; no gap on either.
2. Sweep throughput: ``wattscope sweep`` on the first GPU alone, then on all of ``--gpus``, same models, fresh
   files, each as a command of its own; model configurations per hour = measured / the command's wall time (start-up
   and idle baselines included), and each configuration's energy per image in the several-GPU run against the
   one-GPU run. Arguments after ``--`` are
   ``wattscope sweep`` options (default: ten models at 224 px, batch 64, bf16); ``--gpus`` and ``--db`` are set here.
3. Shards (``--shards``): the same sweep split as two Slurm array tasks would split it, ``--shard 0/2`` on the first
   GPU and ``--shard 1/2`` on the second, two separate processes started together, each with its own file; then
   ``wattscope merge`` of the two. The merged file must hold every configuration once, none lost or doubled, and
   its energies are compared with the several-GPU run's when that ran.

Fake GPUs (``--fake``, CPU only, the bundled fake NVML), for 1, 2, 4 and 8 fake GPUs (``--counts``):

- drain pass wall: the sampler thread drains back to back with nothing else to do (a 1 ns drain period), so its wall
  time per drain is one pass over every GPU (``nvmlDeviceGetSamples`` on each, then publishing). Each call is slowed
  by ``--call-delay-us`` (default 250 us, an H100's cost per call), which the fake spends asleep;
- drain pass CPU: drains only, at the default 250 ms period, each call returning the ~28 samples 250 ms holds at 9 ms
  spacing: the thread's CPU time per drain (the fake computes its samples inside that thread, so its CPU is in it;
  the real driver's ~0.25 ms of CPU per call is not);
- the drain-timing check at the default cadences, as a PowerMeter over every GPU runs them: samples spaced
  ``--sample-period-us`` (default 9 ms, an H100 under load: the ring then holds 1.08 s), the energy counter slowed to
  its H100 cost (4 ms), for ``--seconds``: ring overruns, gaps, coverage and the longest spacing on every GPU, the
  thread's CPU time as a share of one core, and the largest relative error of a GPU's energy against the fake's
  analytic integral (edge effects only).

The per-GPU cost is the least-squares slope over the counts. Exit status 1 when a sample was lost.

Prints the machine, the date and the command with every table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workloads import gemm_loop

DEFAULT_SWEEP_ARGS = [
    "--models",
    "resnet18@224,resnet50@224,mobilenetv3_large_100@224,efficientnet_b0@224,convnext_tiny@224,densenet121@224,"
    "regnety_016@224,vit_small_patch16_224@224,deit_small_patch16_224@224,vit_base_patch16_224@224",
    "--batch-sizes",
    "64",
    "--precisions",
    "bf16",
]
_H100_SAMPLES_CALL_US = 250  # nvmlDeviceGetSamples, measurement-facts §1 (0.2-0.3 ms)
_H100_COUNTER_CALL_US = 4000  # nvmlDeviceGetTotalEnergyConsumption (~4 ms)
_RING = 120
_NEVER_NS = 3600 * 10**9


def _header(title: str) -> None:
    print(f"# multi_gpu_bench: {title}")
    print(f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  {platform.node()}  "
          f"python {platform.python_version()}  {platform.processor() or platform.machine()}")
    print(f"# command: {shlex.join([sys.executable, *sys.argv])}")


# -- fake GPUs ------------------------------------------------------------------------------------------------------


def _drains(n_gpus: int, seconds: float, call_delay_us: int, sample_period_us: int,
            drain_period_ns: int) -> dict[str, float]:
    """The sampler thread with drains only (every other task pushed out by an hour) for ``seconds``: thread wall and
    CPU time per drain pass. A 1 ns drain period makes it drain back to back, so wall per drain is one pass's."""
    from wattscope import _session
    from wattscope.testing import FakeNvml

    fake = FakeNvml.install(n_gpus, drain_period_ns=drain_period_ns, instant_period_ns=_NEVER_NS,
                            average_period_ns=_NEVER_NS, telemetry_period_ns=_NEVER_NS, offset_period_ns=_NEVER_NS,
                            poll_energy=False, poll_instant=False, linger_ns=_NEVER_NS)
    fake.set_delay_us("nvmlDeviceGetSamples", call_delay_us)
    session = _session.current()
    sampler = session.sampler()
    for i in range(n_gpus):
        fake.set_sample_period_us(i, sample_period_us)
        session.slot(i)
    sampler.acquire()
    try:
        time.sleep(0.3)  # the first tick (every task once) and the first drain (whole rings) are behind us
        s0 = sampler.stats()
        time.sleep(seconds)
        s1 = sampler.stats()
    finally:
        sampler.release()
        sampler.stop()
    passes = s1["drains"] - s0["drains"]
    return {
        "wall_us": (s1["thread_wall_ns"] - s0["thread_wall_ns"]) / passes / 1e3,
        "cpu_us": (s1["thread_cpu_ns"] - s0["thread_cpu_ns"]) / passes / 1e3,
    }


def _cadence_check(n_gpus: int, seconds: float, call_delay_us: int, sample_period_us: int) -> dict[str, float]:
    """A PowerMeter over every fake GPU at the default cadences, H100 call costs and sample spacing."""
    import numpy as np

    from wattscope import PowerMeter, _session
    from wattscope.testing import FakeNvml

    fake = FakeNvml.install(n_gpus)
    fake.set_delay_us("nvmlDeviceGetSamples", call_delay_us)
    fake.set_delay_us("nvmlDeviceGetTotalEnergyConsumption", _H100_COUNTER_CALL_US)
    for i in range(n_gpus):
        fake.set_sample_period_us(i, sample_period_us)
        fake.set_trace(i, [0.0, 0.037], [90.0 + 15 * i, 450.0 + 25 * i], repeat_period_s=0.083 + 0.011 * i)
    sampler = _session.current().sampler()
    meter = PowerMeter("all", sync_cuda=False)
    with meter:
        s0 = sampler.stats()
        time.sleep(seconds)
        s1 = sampler.stats()
    r = meter.result
    overruns = sum(sampler.snapshot(slot, r.start_ns, r.stop_ns)["overruns"] for slot in range(n_gpus))
    # Exact reference: the fake's analytic integral over the window the meter integrated (moved by the sensor shift).
    errors = [abs(g.energy_j / fake.energy_j(i, r.start_ns + g.sensor_shift_ns, r.stop_ns + g.sensor_shift_ns) - 1)
              for i, g in enumerate(r.gpus)]
    _session.current().sampler().stop()
    return {
        "cpu_pct": 100.0 * (s1["thread_cpu_ns"] - s0["thread_cpu_ns"]) / (s1["thread_wall_ns"] - s0["thread_wall_ns"]),
        "overruns": overruns,
        "gaps": r.gaps,
        "coverage": r.coverage,
        # Every sample kept: no spacing in the stream around the window above the sensor's own.
        "max_spacing": max(float(np.max(np.diff(g.t_ns))) for g in r.gpus) / (sample_period_us * 1e3),
        "missed": s1["missed_deadlines"] - s0["missed_deadlines"],
        "max_rel_err": max(errors),
    }


def run_fake(args: argparse.Namespace) -> int:
    import numpy as np

    from wattscope import _session

    _header(f"{args.seconds:g} s per count on fake GPUs (CPU only, bundled fake NVML)")
    ring_ms = _RING * args.sample_period_us / 1e3
    new_per_drain = 250e3 / args.sample_period_us
    print(f"# nvmlDeviceGetSamples slowed to {args.call_delay_us} us (wall time: the fake sleeps), energy counter to "
          f"{_H100_COUNTER_CALL_US} us; samples every {args.sample_period_us / 1e3:g} ms (ring of {_RING} = "
          f"{ring_ms:.0f} ms); drain every 250 ms. The fake runs inside the sampler thread: its own CPU time is in the "
          "thread's.\n")
    print("| GPUs | drain pass wall (back to back) | drain pass CPU (250 ms cadence) | thread CPU, default cadences "
          "| ring overruns | gaps | coverage | longest spacing | missed deadlines | max energy error |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    walls, cpus = [], []
    try:
        for n in args.counts:
            back_to_back = _drains(n, min(args.seconds, 2.0), args.call_delay_us, args.sample_period_us, 1)
            paced = _drains(n, args.seconds, args.call_delay_us, args.sample_period_us, 250_000_000)
            c = _cadence_check(n, args.seconds, args.call_delay_us, args.sample_period_us)
            ok = ok and c["overruns"] == 0 and c["gaps"] == 0 and c["coverage"] == 1.0 and c["max_spacing"] < 1.5
            walls.append(back_to_back["wall_us"])
            cpus.append(paced["cpu_us"])
            print(f"| {n} | {back_to_back['wall_us']:.0f} us | {paced['cpu_us']:.0f} us "
                  f"| {c['cpu_pct']:.3f} % of a core | {c['overruns']} | {c['gaps']} | {c['coverage']:.4f} "
                  f"| {c['max_spacing']:.2f} periods | {c['missed']} | {c['max_rel_err']:.1e} |")
    finally:
        _session.reset()
    if len(args.counts) > 1:
        wall_slope_us = np.polyfit(args.counts, walls, 1)[0]
        cpu_slope_us = np.polyfit(args.counts, cpus, 1)[0]
        print(f"\nper added GPU (least-squares slope over {len(args.counts)} counts): {wall_slope_us:.0f} us of drain "
              f"pass wall, {cpu_slope_us:.1f} us of thread CPU per drain (~{new_per_drain:.0f} new samples per GPU)")
    worst_pass_ms = max(args.counts) * (args.call_delay_us + _H100_COUNTER_CALL_US) / 1e3
    print(f"longest tick at {max(args.counts)} GPUs (a drain and a counter reading on every GPU at the nominal call "
          f"costs): ~{worst_pass_ms:.0f} ms, against a ring of {ring_ms:.0f} ms drained every 250 ms")
    print("drain timing: " + ("PASS, no sample lost on any GPU" if ok else "FAIL, samples were lost"))
    return 0 if ok else 1


# -- real GPUs ------------------------------------------------------------------------------------------------------


def run_isolation(gpus: tuple[int, ...], seconds: float) -> bool:
    import torch

    from wattscope import PowerMeter

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise SystemExit("the isolation test needs torch with CUDA and two GPUs (--skip-isolation to leave it out)")
    pair = gpus[:2]
    for i in pair:  # CUDA contexts first: their creation is not part of any window
        torch.zeros(1, device=f"cuda:{i}")
        torch.cuda.synchronize(i)
    time.sleep(2.0)
    with PowerMeter(list(pair), name="idle") as m:
        time.sleep(3.0)
    idle = {g.cuda_index: g.mean_power_w for g in m.result.gpus}
    print(f"\n## isolation: GEMM loop on one GPU, the other idle ({seconds:g} s windows)\n")
    print("idle baseline (3 s): " + ", ".join(f"cuda:{i} {idle[i]:.1f} W" for i in pair) + "\n")
    print("| loaded | loaded GPU mean | idle GPU mean | idle GPU vs its baseline | idle GPU peak | gaps (both) "
          "| coverage | verdict |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    ok = True
    for busy, quiet in (pair, pair[::-1]):
        gemm_loop(torch, busy, 2.0)  # clocks and power settle; cuBLAS picks its kernel
        with PowerMeter(list(pair), name=f"load on cuda:{busy}") as m:
            gemm_loop(torch, busy, seconds)
        r = m.result
        g_busy, g_quiet = r.gpu(busy), r.gpu(quiet)
        delta_w = g_quiet.mean_power_w - idle[quiet]
        gaps = g_busy.gaps + g_quiet.gaps  # one thread drains both rings: a late drain shows as a gap
        passed = (abs(delta_w) <= max(3.0, 0.03 * idle[quiet]) and g_busy.mean_power_w > 1.5 * idle[busy]
                  and gaps == 0)
        ok = ok and passed
        print(f"| cuda:{busy} | {g_busy.mean_power_w:.1f} W | {g_quiet.mean_power_w:.1f} W | {delta_w:+.1f} W "
              f"({delta_w / idle[quiet]:+.1%}) | {g_quiet.peak_power_w:.1f} W | {gaps} | {r.coverage:.4f} "
              f"| {'PASS' if passed else 'FAIL'} |")
    return ok


def _rows(db: Path) -> tuple[dict, int]:
    from wattscope.sweep.store import SweepStore

    with SweepStore(db, read_only=True) as store:
        return {(r.unit_key, r.config.key): r for r in store.results()}, len(store.failures())


def run_sweeps(gpus: tuple[int, ...], sweep_args: list[str], out_dir: Path) -> None:
    """Each sweep in a process of its own, as a user runs it: both pay the same start-up (torch's import, the worker
    fork server), which an in-process second run would have found warm."""
    runs = {}
    for chosen in (gpus[:1], gpus):
        db = out_dir / f"sweep_{len(chosen)}gpu.sqlite"
        if db.exists():
            raise SystemExit(f"{db} exists: a sweep would resume it instead of measuring; choose another --out-dir")
        cmd = [sys.executable, "-m", "wattscope.cli", "sweep", *sweep_args, "--gpus", ",".join(map(str, chosen)),
               "--db", str(db)]
        t0 = time.monotonic()
        done = subprocess.run(cmd, check=False)
        wall_s = time.monotonic() - t0
        if done.returncode != 0 or not db.exists():
            raise SystemExit(f"the sweep on GPUs {chosen} failed (exit status {done.returncode}): {shlex.join(cmd)}")
        rows, failed = _rows(db)
        runs[len(chosen)] = (wall_s, failed, rows)
    print(f"\n## sweep throughput (`wattscope sweep {shlex.join(sweep_args)}`), files in {out_dir}\n")
    print("| GPUs | measured | failed | wall (whole command) | median per configuration | model configurations/hour "
          "| speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    one_rate = 3600.0 * len(runs[1][2]) / runs[1][0]
    for n, (wall_s, failed, rows) in runs.items():
        rate = 3600.0 * len(rows) / wall_s
        median = f"{statistics.median(r.wall_s for r in rows.values()):.1f} s" if rows else "-"
        speedup = f"{rate / one_rate:.2f}x" if one_rate > 0 else "-"
        print(f"| {n} | {len(rows)} | {failed} | {wall_s:.0f} s | {median} | {rate:.0f} | {speedup} |")
    if len(gpus) < 2:
        return
    single, several = runs[1][2], runs[len(gpus)][2]
    print("\nenergy per image, several-GPU run / one-GPU run, per GPU of the several-GPU run:\n")
    print("| GPU | configurations | median ratio | min | max | images/s median ratio | mean power median ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for gpu_uuid in sorted({r.gpu_uuid for r in several.values()}):
        keys = [k for k, r in several.items() if r.gpu_uuid == gpu_uuid and k in single]
        if not keys:
            continue
        e = [several[k].energy_per_image_j / single[k].energy_per_image_j for k in keys]
        ips = [several[k].images_per_s / single[k].images_per_s for k in keys]
        pw = [several[k].mean_power_w / single[k].mean_power_w for k in keys]
        print(f"| {gpu_uuid} | {len(keys)} | {statistics.median(e):.3f} | {min(e):.3f} | {max(e):.3f} "
              f"| {statistics.median(ips):.3f} | {statistics.median(pw):.3f} |")


def run_shards(gpus: tuple[int, ...], sweep_args: list[str], out_dir: Path) -> bool:
    """``--shard i/2`` on the i-th GPU of ``gpus``, two processes started together (two array tasks of one job), then
    ``wattscope merge``. Returns whether the merged file holds each configuration of the shards exactly once."""
    pair = gpus[:2]
    dbs = [out_dir / f"shard{i}of2.sqlite" for i in range(2)]
    merged = out_dir / "shards_merged.sqlite"
    for db in (*dbs, merged):
        if db.exists():
            raise SystemExit(f"{db} exists: choose another --out-dir")
    # Each task sees only its own GPU, as Slurm gives it: CUDA_VISIBLE_DEVICES, and cuda:0 inside.
    cmds = [[sys.executable, "-m", "wattscope.cli", "sweep", *sweep_args, "--shard", f"{i}/2", "--gpus", "0",
             "--db", str(db), "--quiet"] for i, db in enumerate(dbs)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, env=os.environ | {"CUDA_VISIBLE_DEVICES": str(g)})
             for c, g in zip(cmds, pair, strict=True)]
    walls: list[float | None] = [None, None]
    while None in walls:  # each shard's own wall, whichever ends first
        for i, proc in enumerate(procs):
            if walls[i] is None and proc.poll() is not None:
                walls[i] = time.monotonic() - t0
        time.sleep(0.2)
    for proc, cmd in zip(procs, cmds, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"shard failed (exit status {proc.returncode}): {shlex.join(cmd)}")
    merge = [sys.executable, "-m", "wattscope.cli", "merge", str(merged), *map(str, dbs)]
    if subprocess.run(merge, check=False).returncode != 0:
        raise SystemExit(f"merge failed: {shlex.join(merge)}")
    shard_rows = [_rows(db)[0] for db in dbs]
    merged_rows, merged_failed = _rows(merged)
    overlap = set(shard_rows[0]) & set(shard_rows[1])
    expected = set(shard_rows[0]) | set(shard_rows[1])
    ok = not overlap and set(merged_rows) == expected
    print(f"\n## shards: `--shard 0/2` on cuda:{pair[0]} and `--shard 1/2` on cuda:{pair[1]}, two processes, then "
          f"`wattscope merge`\n")
    print("| shard | GPU | configurations | wall |")
    print("|---:|---|---:|---:|")
    for i, (g, rows, wall_s) in enumerate(zip(pair, shard_rows, walls, strict=True)):
        print(f"| {i}/2 | cuda:{g} | {len(rows)} | {wall_s:.0f} s |")
    print(f"\nmerged: {len(merged_rows)} configurations ({merged_failed} failures), {len(overlap)} in both shards, "
          f"{len(expected - set(merged_rows))} missing from the merge: {'PASS' if ok else 'FAIL'}; "
          f"{3600.0 * len(merged_rows) / max(walls):.0f} model configurations/hour (the slower shard's wall)")
    several = out_dir / f"sweep_{len(gpus)}gpu.sqlite"
    if several.exists():
        ref, _ = _rows(several)
        keys = sorted(k for k in merged_rows if k in ref and merged_rows[k].gpu_uuid == ref[k].gpu_uuid)
        if keys:
            e = [merged_rows[k].energy_per_image_j / ref[k].energy_per_image_j for k in keys]
            print(f"energy per image, merged shards / several-GPU run, same board: {len(keys)} configurations, "
                  f"median ratio {statistics.median(e):.3f} (min {min(e):.3f}, max {max(e):.3f})")
    return ok


def run_real(args: argparse.Namespace) -> int:
    import wattscope

    try:
        gpus = wattscope.list_gpus()
    except wattscope.WattscopeError as e:
        raise SystemExit(f"multi_gpu_bench: {e}") from None
    by_cuda = {g.cuda_index: g for g in gpus}
    missing = [i for i in args.gpus if i not in by_cuda]
    if missing:
        raise SystemExit(f"no CUDA device {missing}; wattscope sees: {gpus}")
    _header(f"GPUs {','.join(map(str, args.gpus))}")
    for i in args.gpus:
        g = by_cuda[i]
        print(f"# cuda:{i} {g.name} {g.uuid} {g.pci_bus_id}")
    ok = True
    if not args.skip_isolation:
        ok = run_isolation(args.gpus, args.isolation_s)
    if args.skip_sweep and not args.shards:
        return 0 if ok else 1
    # One folder for both: the shards compare their merge with the several-GPU sweep's file when it is there.
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="multi_gpu_bench_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_args = args.sweep_args or DEFAULT_SWEEP_ARGS
    if not args.skip_sweep:
        run_sweeps(args.gpus, sweep_args, out_dir)
    if args.shards:
        ok = run_shards(args.gpus, sweep_args, out_dir) and ok
    return 0 if ok else 1


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} lists nothing")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sweep_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, sweep_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake", action="store_true", help="fake GPUs on the CPU: drain timing and the thread's cost")
    p.add_argument("--counts", type=_ints, default=(1, 2, 4, 8), help="--fake: numbers of fake GPUs (default 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=5.0, help="--fake: seconds per count (default 5)")
    p.add_argument("--call-delay-us", type=int, default=_H100_SAMPLES_CALL_US,
                   help=f"--fake: cost of one nvmlDeviceGetSamples call (default {_H100_SAMPLES_CALL_US})")
    p.add_argument("--sample-period-us", type=int, default=9000, help="--fake: sample spacing (default 9000)")
    p.add_argument("--gpus", type=_ints, default=(0, 1), help="CUDA indices (default 0,1)")
    p.add_argument("--isolation-s", type=float, default=10.0, help="seconds per isolation window (default 10)")
    p.add_argument("--skip-isolation", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--shards", action="store_true", help="also: --shard 0/2 and 1/2 on two GPUs, then merge")
    p.add_argument("--out-dir", help="where the sweep files go (default: a new temporary folder)")
    args = p.parse_args(argv)
    args.sweep_args = sweep_args
    if args.fake:
        if max(args.counts) > 16 or min(args.counts) < 1:
            p.error("--counts: the fake offers 1 to 16 GPUs")
        return run_fake(args)
    if len(set(args.gpus)) != len(args.gpus):
        p.error("--gpus names a GPU twice")
    if not math.isfinite(args.isolation_s) or args.isolation_s <= 0:
        p.error("--isolation-s must be a positive number of seconds")
    return run_real(args)


if __name__ == "__main__":
    sys.exit(main())
