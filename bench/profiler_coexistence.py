"""torch.profiler and PowerMeter(kernels=True) in one process, in every order: what each of them sees.

    python3 bench/profiler_coexistence.py

A fixed workload (200 bf16 matmuls, one kernel each) runs under:
  1. a kernel meter                        2. torch.profiler
  3. a kernel meter (after the profiler)   4. torch.profiler inside a kernel meter's window
  5. a kernel meter inside torch.profiler  6. a kernel meter (after both)
and for each the kernel records the meter got, and the CUDA events the profiler got, are printed. The user's
profiler must always see its 200 kernels; the meter must see them or say in its notes that it could not.
"""

from __future__ import annotations

import sys

N = 200


def main() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import wattscope

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()

    def work() -> None:
        for _ in range(N):
            a @ a
        torch.cuda.synchronize()

    def meter_count(m) -> str:
        try:
            att = m.kernel_attribution(method="overlap")
        except wattscope.WattscopeError as e:
            return f"error: {e}"
        tl = att.timeline
        gemms = sum(1 for n in tl.name.tolist() if "gemm" in n.lower() or "cutlass" in n.lower() or "sm90" in n)
        notes = "; ".join(att.notes)
        return f"{len(tl)} records ({gemms} gemm), dropped {tl.dropped}" + (f", notes: {notes}" if notes else "")

    def prof_count(p) -> str:
        n = sum(1 for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        return f"{n} CUDA events"

    rows = []
    with wattscope.PowerMeter(0, kernels=True) as m:
        work()
    rows.append(("1 meter", meter_count(m), ""))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        work()
    rows.append(("2 profiler", "", prof_count(p)))
    with wattscope.PowerMeter(0, kernels=True) as m:
        work()
    rows.append(("3 meter after profiler", meter_count(m), ""))
    with wattscope.PowerMeter(0, kernels=True) as m:
        work()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            work()
        work()
    rows.append(("4 profiler inside meter (3x work)", meter_count(m), prof_count(p)))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        work()
        with wattscope.PowerMeter(0, kernels=True) as m:
            work()
        work()
    rows.append(("5 meter inside profiler (3x work)", meter_count(m), prof_count(p)))
    with wattscope.PowerMeter(0, kernels=True) as m:
        work()
    rows.append(("6 meter after both", meter_count(m), ""))
    for name, meter, prof in rows:
        print(f"{name:36} | meter: {meter:60} | profiler: {prof}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
