"""What measuring costs a real model: timm resnet50 inference (random weights), batch 64, bf16 autocast,
channels_last, under each way of watching it, side by side in one run.

    python3 bench/kernel_overhead_bench.py [--device 0] [--graph] [--chunk-seconds 0.25] [--budget-s 150]
        [--modes none_again,meter,meter_kernels,meter_ranges,torch_profiler] [--json OUT.json]
        [--top-seconds 8] [--top-kernels-md OUT.md]

Modes:
  none            the loop alone
  none_again      the loop alone again, run as if it were a mode: the A/A control (its "slowdown" is the method's
                  own bias and resolution; a figure for a mode means something only where it differs from this one)
  meter           one PowerMeter() around the loop
  meter_kernels   one PowerMeter(kernels=True) around the loop
  meter_kernels_only  the same with CUPTI's MEMCPY and MEMSET kinds off (CONCURRENT_KERNEL alone): do they add to
                  the per-launch cost?
  meter_ranges    one PowerMeter(kernels=True, ranges=True) around the loop, an NVTX range around every batch
  cupti_floor     a bare CUPTI client (bench/cupti_floor.c, built here with cc) enabling the kinds a kernel meter
                  enables and doing nothing else: the least any CUPTI kernel tracer can cost, so the kernel meter's
                  figure next to it says how much of its cost is CUPTI's own
  torch_profiler  torch.profiler.profile(activities=[CPU, CUDA]) around the loop (the peer: what users run today
                  to see kernels)
--graph replays the forward pass as one captured CUDA graph instead of launching it eagerly.

Method. The host of our H100 VM changes speed by +-30 % from one second to the next (other tenants), and eager
resnet50 at batch 64 is bound by the host's kernel launches there, so long runs compared round by round cannot
resolve a few percent (sessions 4-5: IQRs of 10-40 points). Here every mode runs in short chunks (--chunk-seconds)
with a `none` chunk before and after it, modes in a fresh random order every round, until --budget-s is spent:
  none, A, none, C, none, B, none, B, none, A, ...
A chunk's slowdown is 1 - its throughput / the mean throughput of its two neighbouring `none` chunks, which cancels
drift slower than a few chunks; a mode's figure is the median over its chunks with a bootstrap 95 % CI of that
median. Each chunk opens its mode (untimed), runs one batch inside it (untimed: the first launches after enabling
CUPTI pay its instrumentation), times --chunk-seconds of batches up to a final synchronize, and closes its mode
(untimed, reported as the per-window cost). A `none` chunk starts after a 50 ms pause and two untimed batches. That
is the steady-state cost of running under a meter; a window's own open and close are reported apart.

Two phases, because CUPTI is never detached once a kernel meter has used it (wattscope does not finalize CUPTI;
torch.profiler does, at the end of each session): phase 1 runs none_again and meter only, in a process that has
not touched CUPTI, and gives the energy-only figure; phase 2 runs every mode. The sampler thread lingers for 3 s
after a meter closes by default, so that back-to-back meters reuse it; here it is set to stop at once
(`wattscope.configure_sampler(linger_ns=0)`), so `none` chunks run without it.

Because torch.profiler runs between kernel meters, this is also a coexistence check: the first meter_kernels chunk
reports how many kernel records it got per batch, and the first torch_profiler chunk how many CUDA events it saw.
Finally one meter_kernels run of --top-seconds is attributed: the top kernels by energy (model estimator when the
sensor response is characterised) with their uncertainties, printed and optionally written as a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from paired_stats import median_ci

MODES = ("none_again", "meter", "meter_kernels", "meter_kernels_only", "meter_ranges", "cupti_floor",
         "torch_profiler")
PRISTINE_MODES = ("none_again", "meter")  # phase 1: no CUPTI in the process yet
GOALS = {"meter": 0.005, "meter_kernels": 0.03}  # the per-kernel issue's overhead goals
SETTLE_S = 0.05


def load_cupti_floor(device: int):
    """Build bench/cupti_floor.c and load it against the libcupti in this process (a kernel meter loads one if
    torch has not)."""
    import wattscope

    so = os.path.join(tempfile.mkdtemp(prefix="cupti_floor"), "cupti_floor.so")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cupti_floor.c")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", so, src, "-ldl", "-lpthread"], check=True)
    lib = ctypes.CDLL(so)
    lib.floor_stop.restype = ctypes.c_uint64
    lib.floor_stop.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    if lib.floor_load() == -1:
        with wattscope.PowerMeter(device, kernels=True):
            pass
    if (rc := lib.floor_load()) != 0:
        raise RuntimeError(f"cupti_floor: cannot load (code {rc}: -1 no libcupti in the process, -2 a symbol missing)")
    return lib


def verdict(goal: float, lo: float, hi: float) -> str:
    if hi <= goal:
        return f"goal <= {goal:.1%}: met (CI below it)"
    if lo > goal:
        return f"goal <= {goal:.1%}: NOT met (CI above it)"
    return f"goal <= {goal:.1%}: undecided (CI straddles it)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--graph", action="store_true", help="replay the forward pass as a captured CUDA graph")
    ap.add_argument("--chunk-seconds", type=float, default=0.25, help="length of one timed chunk")
    ap.add_argument("--budget-s", type=float, default=150.0, help="wall time for both phases together")
    ap.add_argument("--pristine-share", type=float, default=0.3, help="share of the budget for phase 1")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--top-kernels-md")
    ap.add_argument("--top-seconds", type=float, default=8.0,
                    help="length of the one kernel-traced run whose top kernels are attributed (0: skip)")
    args = ap.parse_args()
    modes_wanted = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes_wanted) - set(MODES))
    if unknown or not modes_wanted:
        ap.error(f"--modes: give one or more of {', '.join(MODES)} (unknown: {unknown})")

    import timm
    import torch

    import wattscope

    wattscope.configure_sampler(linger_ns=0)
    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    model = timm.create_model("resnet50", pretrained=False).to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)

    def forward() -> None:
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture.
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not args.graph):
            model(x)

    # Warm-up: cuDNN autotuning, lazy module loading, clocks.
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        forward()
    torch.cuda.synchronize()
    step = forward
    if args.graph:
        side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        step = graph.replay
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    per_batch_s = (time.perf_counter() - t0) / 20
    n_chunk = max(5, int(args.chunk_seconds / per_batch_s))
    kind = "CUDA graph" if args.graph else "eager"
    print(f"resnet50 bs{args.batch} bf16 channels_last, {kind}: {per_batch_s * 1e3:.2f} ms/batch, "
          f"{n_chunk} batches a chunk")

    def loop(n: int, batch_range: str | None = None) -> dict:
        """n batches, each inside an NVTX range of that name when given: the wall time up to a final synchronize,
        and the launching thread's CPU time before it (the synchronize spin-waits, which would count as CPU)."""
        torch.cuda.synchronize()
        t, cpu = time.perf_counter(), time.thread_time()
        for _ in range(n):
            if batch_range is None:
                step()
            else:
                with torch.cuda.nvtx.range(batch_range):
                    step()
        cpu_s = time.thread_time() - cpu
        torch.cuda.synchronize()
        return {"s": time.perf_counter() - t, "cpu_s": cpu_s}

    first_seen: set[str] = set()
    seen = {"records_per_batch": None}  # kernel records a batch makes, once a kernel meter has counted them

    def run_none() -> dict:
        # A settle before timing: right after a kernel meter or torch.profiler closed, the next none chunk ran
        # 0.2-0.9 % slower than the others (session 6), which biased both modes it serves as neighbour for.
        time.sleep(SETTLE_S)
        for _ in range(2):
            step()
        return loop(n_chunk)

    def windowed(open_mode, close_mode, body=lambda _: loop(n_chunk)) -> tuple[dict, object]:
        """Open a mode (timed: the per-window cost), one untimed batch inside it (the first launches after CUPTI is
        enabled pay its instrumentation), the timed body, then close the mode (timed). Returns the body's timings
        and the mode's handle."""
        t = time.perf_counter()
        handle = open_mode()
        open_s = time.perf_counter() - t
        step()
        r = body(handle)
        t = time.perf_counter()
        close_mode(handle)
        return {**r, "open_s": open_s, "close_s": time.perf_counter() - t}, handle

    def stop(m) -> None:
        m.stop()

    def run_meter() -> dict:
        return windowed(lambda: wattscope.PowerMeter(args.device).start(), stop)[0]

    def traced(ranges: bool, mode: str, copies: bool = True) -> dict:
        from wattscope import _session  # the tracer's options: a bench knob, not public API

        tracing = _session.current().kernel_tracing()
        tracing.configure(memcpy=copies, memset=copies)  # for the run this meter starts

        def body(_) -> dict:
            tracing.configure()  # back to the defaults, for the runs after this one
            return loop(n_chunk, batch_range="batch" if ranges else None)

        r, m = windowed(lambda: wattscope.PowerMeter(args.device, kernels=True, ranges=ranges).start(), stop, body)
        if mode not in first_seen:  # the coexistence check, once per mode (an attribution takes a while)
            first_seen.add(mode)
            tl = m.kernel_attribution(method="overlap").timeline
            r.update(records_per_batch=len(tl) / (n_chunk + 1), dropped=tl.dropped)
            seen["records_per_batch"] = r["records_per_batch"]
        return r

    def run_profiler() -> dict:
        from torch.profiler import ProfilerActivity, profile

        def open_mode():
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
            return prof

        r, prof = windowed(open_mode, lambda p: p.__exit__(None, None, None))
        if "torch_profiler" not in first_seen:
            first_seen.add("torch_profiler")
            n_cuda = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            r["cuda_events_per_batch"] = n_cuda / (n_chunk + 1)
        return r

    floor: list = []  # the bare CUPTI client, built and loaded at its first chunk

    def cupti_floor() -> dict:
        if not floor:
            floor.append(load_cupti_floor(args.device))
        lib = floor[0]

        def open_mode():
            if (rc := lib.floor_start()) != 0:
                raise RuntimeError(f"cupti_floor: CUPTI call failed with result {rc}")

        def close_mode(_) -> None:
            refused = ctypes.c_uint64()
            seen_kernels["n"] = lib.floor_stop(ctypes.byref(refused))
            seen_kernels["refused"] = refused.value

        seen_kernels: dict = {}
        r = windowed(open_mode, close_mode)[0]
        if "cupti_floor" not in first_seen:  # is it really tracing? it must see the records a kernel meter sees
            first_seen.add("cupti_floor")
            r.update(records_per_batch=seen_kernels["n"] / (n_chunk + 1), dropped=seen_kernels["refused"])
        return r

    runners = {"none_again": run_none, "meter": run_meter,
               "meter_kernels": lambda: traced(False, "meter_kernels"),
               "meter_kernels_only": lambda: traced(False, "meter_kernels_only", copies=False),
               "meter_ranges": lambda: traced(True, "meter_ranges"),
               "cupti_floor": cupti_floor, "torch_profiler": run_profiler}

    def tput(r: dict) -> float:
        return args.batch * n_chunk / r["s"]

    rng = random.Random(args.seed)

    def phase(name: str, modes: list[str], budget_s: float) -> dict:
        """Chunks none, m1, none, m2, ... until the budget is spent (whole rounds only); each mode chunk paired with
        the mean of its two neighbouring none chunks."""
        print(f"\n== phase {name}: {', '.join(modes)} for {budget_s:.0f} s")
        chunks: list[dict] = []
        nones = [run_none()]
        t_end = time.monotonic() + budget_s
        rounds = 0
        while rounds < 3 or time.monotonic() < t_end:
            order = list(modes)
            rng.shuffle(order)
            for mode in order:
                r = runners[mode]()
                nones.append({**run_none(), "after": mode})
                before, after = nones[-2], nones[-1]
                ref_tput = (tput(before) + tput(after)) / 2
                ref_cpu = (before["cpu_s"] + after["cpu_s"]) / 2
                chunks.append({**r, "mode": mode, "round": rounds, "slowdown": 1 - tput(r) / ref_tput,
                               "extra_cpu": r["cpu_s"] / ref_cpu - 1, "ref_images_per_s": ref_tput,
                               "extra_s_per_batch": (r["s"] - (before["s"] + after["s"]) / 2) / n_chunk,
                               "carry_over": tput(after) / tput(before) - 1})
                extra = ""
                if "records_per_batch" in r:
                    extra = f"  kernel records/batch {r['records_per_batch']:.1f} dropped {r['dropped']}"
                if "cuda_events_per_batch" in r:
                    extra = f"  profiler CUDA events/batch {r['cuda_events_per_batch']:.1f}"
                print(f"  round {rounds:3} {mode:15} {tput(r):8.1f} img/s (none around it {ref_tput:8.1f}) "
                      f"{chunks[-1]['slowdown'] * 100:+7.2f} %  CPU {r['cpu_s'] / n_chunk * 1e3:6.2f} ms/batch"
                      f"{extra}")
            rounds += 1
        np_rng = np.random.default_rng(args.seed)
        summary: dict = {}
        print(f"\n{'mode':15} {'chunks':>6} {'img/s':>8} {'slowdown: median [95% CI]':>32} {'IQR':>20} "
              f"{'extra CPU: median [95% CI]':>32} {'open+close ms':>14}")
        ref = statistics.median(tput(r) for r in nones)
        print(f"{'none':15} {len(nones):6} {ref:8.0f}")
        for mode in modes:
            cs = [c for c in chunks if c["mode"] == mode]
            slow = [c["slowdown"] for c in cs]
            med, lo, hi = median_ci(slow, np_rng)
            q1, _, q3 = statistics.quantiles(slow, n=4, method="inclusive")
            cmed, clo, chi = median_ci([c["extra_cpu"] for c in cs], np_rng)
            edge_ms = statistics.median(c.get("open_s", 0) + c.get("close_s", 0) for c in cs) * 1e3
            summary[mode] = {"chunks": len(cs), "images_per_s": statistics.median(tput(c) for c in cs),
                             "slowdown_median": med, "slowdown_ci95": [lo, hi], "slowdown_iqr": [q1, q3],
                             "extra_cpu_median": cmed, "extra_cpu_ci95": [clo, chi], "open_close_ms": edge_ms}
            print(f"{mode:15} {len(cs):6} {summary[mode]['images_per_s']:8.0f} {med * 100:+12.2f} % "
                  f"[{lo * 100:+6.2f}, {hi * 100:+6.2f}] [{q1 * 100:+6.2f}, {q3 * 100:+6.2f}] "
                  f"{cmed * 100:+12.2f} % [{clo * 100:+6.2f}, {chi * 100:+6.2f}] {edge_ms:14.1f}")
        for mode, goal in GOALS.items():
            if mode in summary:
                lo, hi = summary[mode]["slowdown_ci95"]
                print(f"  {mode}: {verdict(goal, lo, hi)}")
        if {"meter_kernels", "cupti_floor"} <= set(modes):
            # Ours against the bare CUPTI client, round by round (both ran in every round): what wattscope adds.
            by_round: dict[int, dict[str, float]] = {}
            for c in chunks:
                by_round.setdefault(c["round"], {})[c["mode"]] = c["slowdown"]
            diff = [r["meter_kernels"] - r["cupti_floor"] for r in by_round.values()
                    if "meter_kernels" in r and "cupti_floor" in r]
            med, lo, hi = median_ci(diff, np_rng)
            summary["meter_kernels"]["minus_floor"] = {"median": med, "ci95": [lo, hi], "rounds": len(diff)}
            print(f"  meter_kernels - cupti_floor, paired by round ({len(diff)}): {med * 100:+.2f} points "
                  f"[{lo * 100:+.2f}, {hi * 100:+.2f}]")
        # Per batch and per kernel launch (the records a kernel meter counted per batch): the cost in the units that
        # carry over to other models; and whether a mode slows the none chunk after it (its "after" reference).
        per_launch = seen["records_per_batch"]
        print(f"\n{'mode':15} {'extra us/batch':>15} {'extra us/launch':>16} {'none after / before it':>23}")
        for mode in modes:
            cs = [c for c in chunks if c["mode"] == mode]
            extra_us = statistics.median(c["extra_s_per_batch"] for c in cs) * 1e6
            carry = statistics.median(c["carry_over"] for c in cs)
            summary[mode].update(extra_us_per_batch=extra_us, carry_over_median=carry)
            launch = "-"
            if per_launch:
                summary[mode]["extra_us_per_launch"] = extra_us / per_launch
                launch = f"{extra_us / per_launch:+.3f}"
            print(f"{mode:15} {extra_us:+15.1f} {launch:>16} {carry * 100:+22.2f} %")
        return {"chunks": chunks, "nones": nones, "summary": summary, "rounds": rounds}

    t_start = time.monotonic()
    out: dict = {"kind": kind, "per_batch_s": per_batch_s, "batches_per_chunk": n_chunk, "phases": {}}
    pristine = [m for m in PRISTINE_MODES if m in modes_wanted]
    if pristine:
        name = "1 (no CUPTI yet)"
        out["phases"][name] = phase(name, pristine, args.budget_s * args.pristine_share)
    name = "2 (every mode)"
    out["phases"][name] = phase(name, modes_wanted, max(args.budget_s - (time.monotonic() - t_start), 0.0))

    if args.top_seconds > 0:
        # One longer kernel-traced run, attributed: a sub-second window leaves the model too few readings to fit
        # more than a few kernel classes.
        n_top = max(n_chunk, int(args.top_seconds / per_batch_s))
        with wattscope.PowerMeter(args.device, kernels=True) as m:
            loop(n_top)
        att = m.kernel_attribution()
        print(f"\ntop kernels by energy ({att.method} estimator, window {m.result.duration_s:.2f} s, "
              f"{m.result.energy_j:.0f} J ± {m.result.uncertainty_j:.1f} J, residual {att.residual_rms_w:.1f} W):")
        for note in att.notes:
            print("  note:", note)
        table = att.table
        top = table.head(12)
        lines = ["| kernel | calls | time (ms) | energy (J) | ± (J) | mean power (W) | share |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for _, row in top.iterrows():
            name = row["name"] if len(row["name"]) <= 70 else row["name"][:67] + "..."
            lines.append(f"| `{name}` | {row['calls']} | {row['time_s'] * 1e3:.1f} | {row['energy_j']:.2f} | "
                         f"{row['uncertainty_j']:.2f} | {row['mean_power_w']:.0f} | {row['share'] * 100:.1f} % |")
        print("\n".join(lines))
        for key in ("[idle]", "[unattributed]"):
            sel = table[table["name"] == key]
            if len(sel):
                print(f"{key}: {float(sel['energy_j'].iloc[0]):.2f} J")
        if args.top_kernels_md:
            with open(args.top_kernels_md, "w") as f:
                f.write("\n".join(lines) + "\n")
        out.update(top_kernels=top.to_dict(orient="records"), method=att.method)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
