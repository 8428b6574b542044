"""What user ranges cost, per launch and per range, side by side in one run: the figures behind the choice of
mechanism for energy per range (README, "User ranges"; ranges.py).

    python3 bench/range_overhead_bench.py [--device 0] [--rounds 9] [--launches 20000] [--group 100] [--json OUT]

A launch-bound loop of tiny kernels (an in-place add on a 256-element tensor: the GPU finishes each long before
the host launches the next, so time per launch is the host's cost of launching), run in a fresh random order every
round under:
  none             the loop alone
  kernels          PowerMeter(kernels=True) around it
  kernels_ranges   PowerMeter(kernels=True, ranges=True), the loop inside one NVTX range: every launch now also
                   yields a CUPTI API record and an external-correlation record
  nvtx_per_group   as kernels_ranges, plus an NVTX range around every --group launches (push/pop cost)
  phase_per_group  PowerMeter(kernels=True), with an m.phase() around every --group launches (two GPU
                   synchronisations and a sub-window per phase)
Reported per mode: wall time per launch (median over rounds, and its extra over `none` of the same round), the
launching thread's CPU time per launch, and for the grouped modes the extra cost per range/phase. Records per
launch check that tracing saw every launch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import numpy as np
from paired_stats import median_ci
from workloads import interleaved_rounds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--launches", type=int, default=20000)
    ap.add_argument("--group", type=int, default=100, help="launches per range or phase in the grouped modes")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.launches % args.group:
        ap.error("--launches must be a multiple of --group")

    import torch

    import wattscope

    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    x = torch.zeros(256, device=dev)
    n, g = args.launches, args.group
    print(f"# range_overhead_bench {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} "
          f"{platform.node()} {torch.cuda.get_device_name(dev)} torch {torch.__version__}")
    print(f"# command: {' '.join([sys.executable, *sys.argv])}")

    def launches(k: int) -> None:
        for _ in range(k):
            x.add_(1.0)

    def timed(body) -> dict:
        torch.cuda.synchronize()
        t, cpu = time.perf_counter(), time.thread_time()
        body()
        cpu_s = time.thread_time() - cpu  # before the final synchronize, whose spin-wait is not launch cost
        torch.cuda.synchronize()
        return {"s": time.perf_counter() - t, "cpu_s": cpu_s}

    def run_none() -> dict:
        return timed(lambda: launches(n))

    def records(m: wattscope.PowerMeter) -> float:
        return len(m.kernel_attribution(method="overlap").timeline) / n

    def run_kernels() -> dict:
        with wattscope.PowerMeter(args.device, kernels=True) as m:
            r = timed(lambda: launches(n))
        return {**r, "records_per_launch": records(m)}

    def in_ranges(group: int | None) -> dict:
        """The loop inside one NVTX range, in ranges of ``group`` launches within it when given."""
        def body() -> None:
            with torch.cuda.nvtx.range("loop"):
                for _ in range(n // (group or n)):
                    if group:
                        with torch.cuda.nvtx.range("group"):
                            launches(group)
                    else:
                        launches(n)

        with wattscope.PowerMeter(args.device, kernels=True, ranges=True) as m:
            r = timed(body)
        t = m.range_attribution(method="overlap").set_index("range")
        innermost = "loop / group" if group else "loop"
        return {**r, "records_per_launch": records(m), "in_range": float(t.loc[innermost, "kernels"]) / n}

    def run_kernels_ranges() -> dict:
        return in_ranges(None)

    def run_nvtx_groups() -> dict:
        return in_ranges(g)

    def run_phase_groups() -> dict:
        with wattscope.PowerMeter(args.device, kernels=True) as m:
            def body() -> None:
                for _ in range(n // g):
                    with m.phase("group"):
                        launches(g)
            r = timed(body)
        return {**r, "records_per_launch": records(m)}

    modes = {"none": run_none, "kernels": run_kernels, "kernels_ranges": run_kernels_ranges,
             "nvtx_per_group": run_nvtx_groups, "phase_per_group": run_phase_groups}
    for body in modes.values():  # warm-up: CUPTI's first enable, allocator, clocks
        body()
    def report(rep: int, mode: str, r: dict) -> None:
        extra = "".join(f" {k} {r[k]:.3f}" for k in ("records_per_launch", "in_range") if k in r)
        print(f"  round {rep} {mode:16} {r['s'] / n * 1e6:7.3f} us/launch, CPU {r['cpu_s'] / n * 1e6:7.3f}{extra}")

    runs = interleaved_rounds(modes, args.rounds, report)

    print(f"\n{n} launches a run, {args.rounds} rounds; medians over rounds "
          "(extra: against `none` of the same round)\n")
    print("| mode | wall per launch | extra per launch [95 % CI] | CPU per launch | extra CPU per launch | extra per "
          "range or phase | records per launch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    rng = np.random.default_rng(0)
    for mode, rs in runs.items():
        wall = statistics.median(r["s"] / n * 1e6 for r in rs)
        cpu = statistics.median(r["cpu_s"] / n * 1e6 for r in rs)
        extra, extra_lo, extra_hi = median_ci([(r["s"] - b["s"]) / n * 1e6
                                               for r, b in zip(rs, runs["none"], strict=True)], rng)
        extra_cpu = statistics.median((r["cpu_s"] - b["cpu_s"]) / n * 1e6
                                      for r, b in zip(rs, runs["none"], strict=True))
        per_group = "-"
        ref = {"nvtx_per_group": "kernels_ranges", "phase_per_group": "kernels"}.get(mode)
        if ref:
            per_group_us = statistics.median((r["s"] - b["s"]) / (n // g) * 1e6
                                             for r, b in zip(rs, runs[ref], strict=True))
            per_group = f"{per_group_us:.1f} us (vs {ref})"
        rec = statistics.median(r["records_per_launch"] for r in rs) if "records_per_launch" in rs[0] else None
        summary[mode] = {"wall_us_per_launch": wall, "extra_us_per_launch": extra,
                         "extra_us_per_launch_ci95": [extra_lo, extra_hi], "cpu_us_per_launch": cpu,
                         "extra_cpu_us_per_launch": extra_cpu, "per_group": per_group, "records_per_launch": rec}
        print(f"| {mode} | {wall:.3f} us | {extra:+.3f} us [{extra_lo:+.3f}, {extra_hi:+.3f}] | {cpu:.3f} us | "
              f"{extra_cpu:+.3f} us | {per_group} | "
              f"{'-' if rec is None else f'{rec:.3f}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"launches": n, "group": g, "summary": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
