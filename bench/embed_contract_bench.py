"""The figures of the README's embedding contract: what a harness pays per window, and how results behave across
threads and fork.

    python bench/embed_contract_bench.py [--fake] [--windows 20000]

--fake runs against the bundled fake NVML (no GPU needed); without it, against GPU 0. Prints, per figure, the best
and the median of 5 batches:

* start()+stop() of one meter reused, of a new PowerMeter(0) each time, and a call through a decorated meter;
* ``result`` of a closed window whose readings have already arrived (read later, in bulk, as the pytest plugin does);
* ``result`` read right after ``stop()``: it waits for the readings that cover the window's end;
* 8 threads sharing one decorated meter: every call gets its own window;
* fork: a window opened before fork() is refused in the child and intact in the parent.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable


def _per_call_us(fn: Callable[[], object], n: int) -> tuple[float, float]:
    batches = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        batches.append((time.perf_counter_ns() - t0) / n / 1e3)
    return min(batches), statistics.median(batches)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake", action="store_true", help="use the bundled fake NVML (one fake H100 at 100 W)")
    p.add_argument("--windows", type=int, default=20000, help="windows per batch for the start/stop figures")
    args = p.parse_args()
    import wattscope
    from wattscope import MeasurementError, PowerMeter

    if args.fake:
        from wattscope.testing import FakeNvml

        FakeNvml.install(1).set_trace(0, [0.0], [100.0])
    print(f"# embed_contract_bench  {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"# command: {' '.join([sys.argv[0], *sys.argv[1:]])}")
    print(f"# GPU 0: {wattscope.list_gpus()[0].name}{' (fake NVML)' if args.fake else ''}")

    holder = PowerMeter(0, sync_cuda=False).start()  # keep the sampler thread running, as in a busy harness
    reused = PowerMeter(0, sync_cuda=False)

    def start_stop() -> None:
        reused.start()
        reused.stop()

    decorated = PowerMeter(0, sync_cuda=False)

    @decorated
    def call() -> None:
        pass

    n = args.windows
    rows = [
        ("start()+stop(), one meter reused", _per_call_us(start_stop, n)),
        ("PowerMeter(0).start().stop(), new meter", _per_call_us(lambda: PowerMeter(0, sync_cuda=False).start().stop(),
                                                                 n // 10)),
        ("call through a decorated meter", _per_call_us(call, n)),
    ]
    closed = []
    for _ in range(1000):
        m = PowerMeter(0, sync_cuda=False).start()
        time.sleep(0.0005)
        closed.append(m.stop())
    time.sleep(1.0)  # their readings arrive
    it = iter(closed)
    rows.append(("result of a closed window, read later", _per_call_us(lambda: next(it).result, 200)))
    holder.stop()
    for label, (best, median) in rows:
        print(f"{label:44s} best {best:8.1f} us   median {median:8.1f} us")

    waits = []
    for _ in range(10):
        with PowerMeter(0, sync_cuda=False) as m:
            time.sleep(0.05)
        t0 = time.perf_counter()
        _ = m.result
        waits.append(time.perf_counter() - t0)
    print(f"{'result read right after stop()':44s} median {statistics.median(waits) * 1e3:.0f} ms, "
          f"max {max(waits) * 1e3:.0f} ms (waits for the readings that cover the window's end)")

    shared = PowerMeter(0, sync_cuda=False)

    @shared
    def step() -> None:
        time.sleep(0.001)

    threads = [threading.Thread(target=lambda: [step() for _ in range(100)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = shared.results
    print(f"8 threads x 100 calls of one decorated meter: {len(results)} results, "
          f"{len({r.start_ns for r in results})} distinct windows")

    if hasattr(os, "fork"):
        m = PowerMeter(0, sync_cuda=False).start()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            m.stop()
            try:
                _ = m.result
                verdict = "read (unexpected)"
            except MeasurementError:
                verdict = "refused (MeasurementError)"
            with PowerMeter(0, sync_cuda=False) as own:
                time.sleep(0.1)
            os.write(w, f"{verdict}; a new meter in the child: {own.result.energy_j:.3f} J".encode())
            os._exit(0)
        os.close(w)
        child = os.read(r, 4096).decode()
        os.waitpid(pid, 0)
        m.stop()
        print(f"fork: the parent's open window in the child: {child}; in the parent: "
              f"{m.result.energy_j:.3f} J, coverage {m.result.coverage:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
