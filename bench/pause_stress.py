"""Is pausing CUPTI's activity kinds mid-recording safe? Session 7 call 2 aborted with glibc heap errors ("double free",
"invalid pointer", at exit) after KernelTracer.pause/resume cycles with kernels in flight. This runs each way of
pausing in a child process of its own (glibc's checks on, MALLOC_CHECK_=3), with matmuls in flight at every toggle,
and reports how each child ended.

    python3 bench/pause_stress.py [--cycles 60] [--variants pause,stop_start,meter]

Variants:
  pause           KernelTracer.pause() / resume() from the launching thread (a resume force-flushes before enabling
                  the kinds again, since session 7 call 7; call 3 ran it without a flush, and with a forced flush
                  right after the pause: both clean, that flush losing 655 of 1200 records as untimed)
  stop_start      stop() and a new tracer's start(), as wattscope does around a torch.profiler session
  meter           PowerMeter(kernels=True, kernel_duty=0.5) for cycles x 0.5 s: the sampler thread's own pauses

Clean runs here did not rule the corruption out: it struck the overhead bench mid-run in two of three calls that
paused, never this script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

VARIANTS = ("pause", "stop_start", "meter")


def child(variant: str, cycles: int) -> int:
    import torch

    import wattscope
    from wattscope import _core

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    t0 = time.monotonic()
    if variant == "meter":
        with wattscope.PowerMeter(0, kernels=True, kernel_duty=0.5) as m:
            t_end = time.monotonic() + 0.5 * cycles
            while time.monotonic() < t_end:
                for _ in range(20):
                    a @ a
                torch.cuda.synchronize()
        att = m.kernel_attribution(method="overlap")
        print(f"meter: {len(m._kernel_capture.paused)} pauses, {int((att.timeline.kind == 'kernel').sum())} records, "
              f"dropped {att.timeline.dropped}")
    else:
        cupti = _core.Cupti("")
        tracer = _core.KernelTracer(cupti)
        tracer.start()
        records = 0
        for _ in range(cycles):
            for _ in range(30):
                a @ a  # in flight at the toggle: no synchronize before it
            if variant == "stop_start":
                tracer.stop()
                records += len(tracer.snapshot()["start_ns"])
                tracer = _core.KernelTracer(cupti)
                tracer.start()
            else:
                tracer.pause()
                for _ in range(30):
                    a @ a
                tracer.resume()
            tracer.flush(False)
        torch.cuda.synchronize()
        tracer.stop()
        snap = tracer.snapshot()
        records += len(snap["start_ns"])
        print(f"{variant}: {cycles} cycles, {records} records, incomplete {snap['records_incomplete']}, "
              f"dropped {snap['records_dropped']}, pauses {len(snap['paused_start_ns'])}")
    print(f"{variant}: {time.monotonic() - t0:.1f} s, exiting")
    sys.stdout.flush()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.cycles)
    env = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
    failed = 0
    for variant in args.variants.split(","):
        p = subprocess.run([sys.executable, __file__, "--child", variant, "--cycles", str(args.cycles)],
                           capture_output=True, text=True, env=env, timeout=300)
        verdict = "clean" if p.returncode == 0 else f"FAILED (exit status {p.returncode})"
        failed += p.returncode != 0
        print(f"== {variant}: {verdict}")
        for line in (p.stdout + p.stderr).strip().splitlines()[-8:]:
            print("   ", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
