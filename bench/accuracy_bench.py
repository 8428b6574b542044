"""Accuracy on a real GPU under a bf16 matmul load.

1. A 10 s load: integral of the buffered samples vs the energy-counter delta.
2. 200 ms regions inside sustained load: wattscope's estimate and Zeus's (energy counter at the edges), each against
   the long-run mean power × the region's duration. Regions start at random phases against the sensor clock."""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from wattscope import PowerMeter  # noqa: E402

A = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)


def load_for(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(4):
            A @ A
        torch.cuda.synchronize()


def main() -> None:
    load_for(3.0)  # warm, reach steady clocks and temperature
    with PowerMeter(0) as long_run:
        load_for(10.0)
    r = long_run.result
    g = r.gpus[0]
    p_long = r.mean_power_w
    print(f"10 s load: samples {g.energy_j:.1f} J, counter {g.counter_energy_j:.1f} J, "
          f"difference {100 * (g.energy_j / g.counter_energy_j - 1):+.3f} %; mean power {p_long:.1f} W "
          f"± {r.uncertainty_j:.2f} J")
    try:
        from peers import ZeusWindow

        zeus = ZeusWindow(0)
    except Exception as e:
        print(f"Zeus unavailable: {e!r}")
        zeus = None
    ours_err, zeus_err = [], []
    for _ in range(15):
        load_for(random.uniform(0.05, 0.3))
        if zeus:
            zeus.begin()
        with PowerMeter(0) as m:
            load_for(0.2)
        z_j = zeus.end() if zeus else None
        ours = m.result
        ours_err.append(100 * (ours.energy_j / (p_long * ours.duration_s) - 1))
        if zeus and z_j is not None:
            zeus_err.append(100 * (z_j / (p_long * zeus.last.time) - 1))
    print(f"200 ms regions (n={len(ours_err)}): wattscope error vs long-run mean: median {statistics.median(ours_err):+.2f} %, "
          f"mean |err| {statistics.mean(abs(e) for e in ours_err):.2f} %, max |err| {max(abs(e) for e in ours_err):.2f} %")
    if zeus_err:
        print(f"                          Zeus error vs long-run mean: median {statistics.median(zeus_err):+.2f} %, "
              f"mean |err| {statistics.mean(abs(e) for e in zeus_err):.2f} %, max |err| {max(abs(e) for e in zeus_err):.2f} %")


if __name__ == "__main__":
    main()
