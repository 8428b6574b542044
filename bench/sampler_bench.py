"""Sampler on a real GPU: samples collected per second vs the sensor's own rate, gaps, and the CPU time of the
sampler thread. Usage: python bench/sampler_bench.py [seconds]"""

from __future__ import annotations

import sys
import time

import numpy as np

from wattscope import PowerMeter, _session


def main(seconds: float) -> None:
    sampler = _session.current().sampler()
    with PowerMeter(0, sync_cuda=False) as m:
        pass
    _ = m.result  # warm: thread running, device added
    cpu0, wall0 = sampler.stats()["thread_cpu_ns"], sampler.stats()["thread_wall_ns"]
    with PowerMeter(0, sync_cuda=False) as m:
        time.sleep(seconds)
    r = m.result
    st = sampler.stats()
    g = r.gpus[0]
    t = g.t_ns[(g.t_ns >= r.start_ns) & (g.t_ns <= r.stop_ns)]
    spacing_ms = np.diff(t) / 1e6
    cpu_pct = 100.0 * (st["thread_cpu_ns"] - cpu0) / (st["thread_wall_ns"] - wall0)
    print(f"window {r.duration_s:.1f} s on {g.name}")
    print(f"samples collected: {len(t)} = {len(t) / r.duration_s:.2f}/s; sensor spacing median {np.median(spacing_ms):.2f} ms "
          f"(=> {1000 / np.median(spacing_ms):.2f}/s), p1 {np.percentile(spacing_ms, 1):.1f} ms, "
          f"p99 {np.percentile(spacing_ms, 99):.1f} ms, max {spacing_ms.max():.1f} ms")
    print(f"gaps: {r.gaps}; coverage {r.coverage:.4f}; missed deadlines {st['missed_deadlines']}")
    print(f"sampler thread CPU: {cpu_pct:.3f} % of one core (default cadences)")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
