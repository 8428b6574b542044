"""Host overhead of one measured window (enter + exit, no CUDA sync), side by side in one run: wattscope's
PowerMeter, a Python pynvml polling thread (begin/end), and Zeus begin_window/end_window, on GPU 0."""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from wattscope import PowerMeter  # noqa: E402


def per_call_us(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(samples)


def main() -> None:
    m = PowerMeter(0, sync_cuda=False)

    def ours() -> None:
        with m:
            pass

    ours()
    _ = m.result
    rows = [("wattscope PowerMeter", per_call_us(ours, 2000))]
    try:
        from peers import PynvmlPoller, ZeusWindow

        poller = PynvmlPoller(0, interval_s=0.01)
        rows.append(("pynvml poll thread", per_call_us(lambda: (poller.begin(), poller.end()), 2000)))
        poller.close()
        zeus = ZeusWindow(0)
        rows.append(("Zeus begin/end_window", per_call_us(lambda: (zeus.begin(), zeus.end()), 50)))
    except Exception as e:  # peers missing: still report ours
        print(f"peer unavailable: {e!r}")
    base = rows[0][1]
    print(f"{'tool':<24}{'median µs per window':>22}{'ratio to wattscope':>20}")
    for name, us in rows:
        print(f"{name:<24}{us:>22.2f}{us / base:>20.1f}")


if __name__ == "__main__":
    main()
