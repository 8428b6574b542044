"""Sampler on a real GPU at the default cadences: samples collected per second vs the sensor's own rate, ring
overruns (native: samples the driver produced but a drain came too late for), gaps (wattscope/energy.py over the run's
snapshot: every hole in the stream, whatever its cause), and the CPU time of the sampler thread.
Usage: python bench/sampler_bench.py [seconds]"""

from __future__ import annotations

import sys
import time

import numpy as np

from wattscope import _session, energy


def main(seconds: float) -> None:
    session = _session.current()
    sampler = session.sampler()
    slot = session.slot(0)  # NVML index 0
    name = session.nvml().device_info(0)["name"]
    sampler.acquire()
    try:
        sampler.wait_covered(time.monotonic_ns(), 2_000_000_000)  # warm: thread running, the ring drained once
        s0 = sampler.stats()
        start_ns = time.monotonic_ns()
        time.sleep(seconds)
        stop_ns = time.monotonic_ns()
        s1 = sampler.stats()
        sampler.wait_covered(stop_ns + 25_000_000, 2_000_000_000)
        snap = sampler.snapshot(slot, start_ns, stop_ns)
    finally:
        sampler.release()
    t_ns = snap["samples"]["t_ns"]
    period_ns = snap["sample_period_ns"] or None
    we = energy.integrate_window(t_ns, snap["samples"]["value"] / 1000.0, start_ns, stop_ns, period_ns=period_ns)
    duration_s = (stop_ns - start_ns) / 1e9
    inside = t_ns[(t_ns >= start_ns) & (t_ns <= stop_ns)]
    spacing_ms = np.diff(inside) / 1e6
    gap_s = float(np.sum(we.gaps_ns[:, 1] - we.gaps_ns[:, 0]) / 1e9) if len(we.gaps_ns) else 0.0
    cpu_pct = 100.0 * (s1["thread_cpu_ns"] - s0["thread_cpu_ns"]) / (s1["thread_wall_ns"] - s0["thread_wall_ns"])
    print(f"window {duration_s:.1f} s on {name}")
    print(f"samples collected: {len(inside)} = {len(inside) / duration_s:.2f}/s; sensor spacing median "
          f"{np.median(spacing_ms):.2f} ms (=> {1000 / np.median(spacing_ms):.2f}/s), p1 "
          f"{np.percentile(spacing_ms, 1):.1f} ms, p99 {np.percentile(spacing_ms, 99):.1f} ms, "
          f"max {spacing_ms.max():.1f} ms")
    print(f"ring overruns (native): {s1['overruns'] - s0['overruns']}; gaps (energy.py): {len(we.gaps_ns)} "
          f"({gap_s:.3f} s); coverage {we.coverage:.4f}")
    print(f"drains {s1['drains'] - s0['drains']}, ticks {s1['ticks'] - s0['ticks']}, missed deadlines "
          f"{s1['missed_deadlines'] - s0['missed_deadlines']}, clock steps {s1['clock_steps'] - s0['clock_steps']}")
    print(f"sampler thread CPU: {cpu_pct:.3f} % of one core (default cadences)")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
