"""CPU cost of the sampler thread per polling cadence, side by side in one run on GPU 0 (idle).
Usage: python bench/cadence_bench.py [seconds per configuration]"""

from __future__ import annotations

import sys
import time

import wattscope
from wattscope import PowerMeter, _session

CONFIGS = {
    "default": {},
    "no instant field": {"poll_instant": False},
    "no instant, average 1 Hz": {"poll_instant": False, "average_period_ns": 1_000_000_000},
    "no instant, average 1 Hz, no counter": {"poll_instant": False, "average_period_ns": 1_000_000_000,
                                             "poll_energy": False},
}


def main(seconds: float) -> None:
    print(f"{'configuration':<40}{'CPU % of a core':>16}{'samples/s':>11}{'gaps':>6}")
    for name, options in CONFIGS.items():
        wattscope.configure_sampler(**options)
        sampler = _session.current().sampler()
        with PowerMeter(0, sync_cuda=False) as m:
            time.sleep(0.3)
        _ = m.result
        s0 = sampler.stats()
        with PowerMeter(0, sync_cuda=False) as m:
            time.sleep(seconds)
        r = m.result
        s1 = sampler.stats()
        cpu = 100.0 * (s1["thread_cpu_ns"] - s0["thread_cpu_ns"]) / (s1["thread_wall_ns"] - s0["thread_wall_ns"])
        g = r.gpus[0]
        n = ((g.t_ns >= r.start_ns) & (g.t_ns <= r.stop_ns)).sum()
        print(f"{name:<40}{cpu:>16.3f}{n / r.duration_s:>11.2f}{r.gaps:>6}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0)
