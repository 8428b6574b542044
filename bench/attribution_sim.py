"""SIMULATION, not a GPU measurement: per-class error of the two per-kernel energy estimators (wattscope.kernels)
against synthetic ground truth, for kernels of 0.1, 1, 10 and 50 ms.

Ground truth: three kernel classes drawing 650, 300 and 150 W (board power while they run) over an 80 W idle, one
stream, random class order, durations log-uniform within x0.5..x2 of the nominal one, idle gaps uniform in
[0, nominal]. Readings: the true power through the H100 profile (first-order low-pass tau 12.5 ms, delay 3.8 ms),
stamped every 20 ms +- 3 ms (uniform jitter), with 2 W of Gaussian noise. The estimators get the same response
("matched") or a mis-specified one (the built-in default tau 11.5 ms with no delay), to show how much a calibration
matters. Errors are the median over seeds of the signed per-class error, and the largest |error|.
``--call-spread s`` makes each call's power above idle vary by a factor drawn from {1 - s, 1, 1 + s}: the model
then fits one mean power per class while the truth is each call's own.

    python bench/attribution_sim.py [--seconds 20] [--seeds 5] [--call-spread 0.2]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from wattscope.kernels import KernelTimeline, attribute
from wattscope.response import Response, filtered_indicator

MS = 1_000_000
T0 = 5 * 10**15
POWER_W = {"gemm": 650.0, "attn": 300.0, "copy": 150.0}
IDLE_W = 80.0
TRUE_RESPONSE = Response("lowpass", 12.5 * MS, 3.8 * MS)
DEFAULT_RESPONSE = Response("lowpass", 11.5 * MS, 0.0)


def simulate(seed: int, nominal_ms: float, busy_s: float, call_spread: float):
    rng = np.random.default_rng(seed)
    t = T0 + 100 * MS
    stop = t + int(busy_s * 1e9)
    start, end, name = [], [], []
    names = list(POWER_W)
    while t < stop:
        d = max(1_000, int(nominal_ms * math.exp(rng.uniform(math.log(0.5), math.log(2.0))) * MS))
        start.append(t)
        end.append(t + d)
        name.append(names[int(rng.integers(3))])
        t += d + int(rng.uniform(0, nominal_ms) * MS)
    n = len(start)
    tl = KernelTimeline(np.array(start), np.array(end), np.array(name, dtype=object), np.zeros(n, np.int64),
                        np.zeros(n, np.int64), np.array(["kernel"] * n, dtype=object))
    a, b = T0, t + 100 * MS
    stamps = a - 60 * MS + np.cumsum(20 * MS + rng.integers(-3 * MS, 3 * MS + 1, size=(b - a) // (20 * MS) + 12))
    power = np.full(stamps.size, IDLE_W)
    durations = (tl.end_ns - tl.start_ns).astype(float)
    factor = 1.0 + call_spread * rng.integers(-1, 2, size=n)
    truth = {}
    for cls, w in POWER_W.items():
        truth[cls] = 0.0
        for f in np.unique(factor):
            sel = (tl.name == cls) & (factor == f)
            busy = np.stack([tl.start_ns[sel], tl.end_ns[sel]], 1)
            power += (w - IDLE_W) * f * filtered_indicator(busy, stamps, TRUE_RESPONSE)
            truth[cls] += (IDLE_W + (w - IDLE_W) * f) * float(durations[sel].sum()) / 1e9
    return tl, stamps, power + rng.normal(0.0, 2.0, stamps.size), a, b, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="busy time per run, s")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--call-spread", type=float, default=0.0, help="per-call power spread above idle, 0..1")
    args = parser.parse_args()
    print("SIMULATION (synthetic readings, no GPU): wattscope.kernels estimators vs known per-class energy")
    print(f"truth: {POWER_W} W over idle {IDLE_W} W; sensor {TRUE_RESPONSE.describe()}, 20 +- 3 ms stamps, 2 W noise;"
          f" {args.seconds:g} s of work per run, {args.seeds} seeds, per-call power spread {args.call_spread:g}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    print()
    header = f"{'kernel':>7} {'estimator':<22}" + "".join(f"{c + ' err':>19}" for c in POWER_W) + f"{'time/run':>10}"
    print(header)
    print(f"{'':>7} {'':<22}" + "".join(f"{'median (max|.|)':>19}" for _ in POWER_W))
    for nominal_ms in (0.1, 1.0, 10.0, 50.0):
        runs = [simulate(seed, nominal_ms, args.seconds, args.call_spread) for seed in range(args.seeds)]
        calls = len(runs[0][0])
        for label, method, response in (
            ("overlap", "overlap", TRUE_RESPONSE),
            ("model (matched)", "model", TRUE_RESPONSE),
            ("model (tau 11.5, d 0)", "model", DEFAULT_RESPONSE),
        ):
            errors: dict[str, list[float]] = {c: [] for c in POWER_W}
            began = time.perf_counter()
            for tl, t, p, a, b, truth in runs:
                rows = {r.name: r for r in attribute(tl, t, p, a, b, response=response, method=method).rows}
                for cls, true_j in truth.items():
                    errors[cls].append(100.0 * (rows[cls].energy_j / true_j - 1.0))
            per_run_ms = 1e3 * (time.perf_counter() - began) / len(runs)
            cells = "".join(
                f"{np.median(e):>+10.2f}% ({np.max(np.abs(e)):5.2f}%)" for e in errors.values()
            )
            print(f"{nominal_ms:>5g}ms {label:<22}{cells}{per_run_ms:>8.0f}ms")
        print(f"{'':>7} ({calls} calls per run)")


if __name__ == "__main__":
    main()
