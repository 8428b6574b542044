"""Does a process that used torch.profiler exit cleanly? One scenario per run, in a fresh process each (the abort
happens at exit, after the C++ static destructors, when the CUDA runtime releases its context: profiler_guard.py).

    python3 bench/exit_check.py SCENARIO     (stage exitcheck of bench/gpu_check.sh runs each several times)

Scenarios:
  meter_profiler        a kernel meter around matmuls with a torch.profiler session inside it, as the GPU test does;
                        wattscope's exit hook detaches CUPTI (printed: cuptiFinalize's code)
  meter_profiler_keep   the same with the detach switched off (is it what ends the abort?)
  profiler_only         torch.profiler around matmuls, wattscope not imported: plain torch, with whatever
                        TEARDOWN_CUPTI the caller set
The exit status says it: 0 clean, 134 an abort (SIGABRT), 139 a segfault.
"""

from __future__ import annotations

import sys


def matmuls(torch, a, n: int) -> None:
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()


def main(scenario: str) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(1024, 1024, device="cuda")
    matmuls(torch, a, 5)
    if scenario == "profiler_only":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            matmuls(torch, a, 50)
        print(f"profiler saw {sum(1 for e in prof.events() if e.device_type.name == 'CUDA')} CUDA events")
        return 0
    if scenario not in ("meter_profiler", "meter_profiler_keep"):
        print(f"unknown scenario {scenario!r}: {__doc__}", file=sys.stderr)
        return 2
    import wattscope
    from wattscope import _session, kernel_session, profiler_guard

    with wattscope.PowerMeter(0, kernels=True) as m:
        matmuls(torch, a, 50)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            matmuls(torch, a, 50)
        matmuls(torch, a, 50)
    n = int((m.kernel_attribution(method="overlap").timeline.kind == "kernel").sum())
    print(f"kernel meter: {n} kernel records; Kineto left attached: {profiler_guard.kineto_left_attached()}")
    if scenario == "meter_profiler_keep":
        profiler_guard.kineto_left_attached = lambda: False  # the exit hook then leaves CUPTI attached
    _session.current().shutdown()  # what the exit hook does, here to print cuptiFinalize's code
    rc = kernel_session.detach_at_exit()
    print(f"detach at exit: cuptiFinalize -> {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "meter_profiler"))
