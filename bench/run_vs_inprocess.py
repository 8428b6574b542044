"""Validation of `wattscope run`: its measurement of a child process against an in-process PowerMeter.

    python bench/run_vs_inprocess.py [--device 0] [--seconds 10] [--size 8192]

1. Runs this script with ``--workload`` as a child under ``wattscope.embed.runner.run_command`` (the engine of
   `wattscope run`, which adds only printing and file writing). The child warms up a bf16 GEMM loop on the GPU,
   then measures ``--seconds`` of it with its own in-process PowerMeter and writes that Measurement as JSON.
   Same window, two processes: the parent's readings integrated over the child's window must agree with the
   child's measurement within their stated uncertainties (both read the same NVML sample stream; this checks the
   clock, the process boundary and the window edges).
2. Reports the parent's whole-run energy too (the child's start-up, imports and CUDA initialisation included).
3. Runs the same workload in this process under a PowerMeter: a separate run of the same work, so its energy differs
   by run-to-run variation (clocks, temperature), which the uncertainties do not cover; printed for context.

Needs torch with CUDA and an NVIDIA GPU (nothing else, no network); about 35 s with the defaults. Prints the machine,
the date and every figure with its uncertainty; "AGREE" when step 1's difference is within the combined stated
uncertainty (one sigma).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

from workloads import gemm_loop


def _gemm_loop(seconds: float, size: int, torch_index: int) -> tuple[int, float]:
    import torch

    return gemm_loop(torch, torch_index, seconds, size)


def _torch_index(uuid: str) -> int:
    import torch

    for i in range(torch.cuda.device_count()):
        if "gpu-" + str(torch.cuda.get_device_properties(i).uuid).lower() == uuid.lower():
            return i
    raise SystemExit(f"no CUDA device with UUID {uuid} in this process")


def _workload(args: argparse.Namespace) -> int:
    """The child: warm up, then measure the loop in-process and write the Measurement."""
    import torch

    from wattscope import PowerMeter

    index = _torch_index(args.device_uuid)
    torch.cuda.init()
    _gemm_loop(2.0, args.size, index)  # clocks and power settle; cuBLAS picks its kernel
    with PowerMeter(args.device_uuid, name="child in-process") as m:
        gemms, seconds = _gemm_loop(args.seconds, args.size, index)
    r = m.result
    r.to_json(args.child_json)
    print(f"child: {gemms} GEMMs of {args.size}^3 in {seconds:.2f} s; {r}", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=int, default=0, help="CUDA index of the GPU (default 0)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured length of the GEMM loop (default 10)")
    p.add_argument("--size", type=int, default=8192, help="square matrix size (default 8192)")
    p.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device-uuid", help=argparse.SUPPRESS)
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.workload:
        return _workload(args)

    import wattscope
    from wattscope.embed.runner import run_command
    from wattscope.embed.windows import sub_window

    try:
        import torch
    except ImportError:
        raise SystemExit("run_vs_inprocess needs torch with CUDA (pip install torch)") from None
    if not torch.cuda.is_available():
        raise SystemExit("run_vs_inprocess needs an NVIDIA GPU: torch.cuda.is_available() is False")
    try:
        gpus = wattscope.list_gpus()
    except wattscope.WattscopeError as e:
        raise SystemExit(f"run_vs_inprocess: {e}") from None
    gpu = next((g for g in gpus if g.cuda_index == args.device), None)
    if gpu is None:
        raise SystemExit(f"no CUDA device {args.device}; wattscope sees: {gpus}")
    print(f"# run_vs_inprocess  {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}")
    print(f"# GPU cuda:{args.device} {gpu.name} {gpu.uuid}; python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")

    with tempfile.TemporaryDirectory() as tmp:
        child_json = Path(tmp) / "child.json"
        cmd = [sys.executable, __file__, "--workload", "--device-uuid", gpu.uuid, "--child-json", str(child_json),
               "--seconds", str(args.seconds), "--size", str(args.size)]
        run = run_command(cmd, devices=gpu.uuid, name="wattscope run")
        if run.exit_code != 0:
            raise SystemExit(f"the workload failed with exit status {run.exit_code}")
        child = json.loads(child_json.read_text())

    whole = run.measurement
    same = sub_window(whole, child["start_ns"], child["stop_ns"])
    diff_j = same.energy_j - child["energy_j"]
    sigma_j = math.hypot(same.uncertainty_j, child["uncertainty_j"])
    print("\n1. same window, two processes (the child's GEMM loop)")
    print(f"   wattscope run (parent readings): {same.energy_j:10.3f} J ± {same.uncertainty_j:.3f} J "
          f"over {same.duration_s:.3f} s, mean {same.energy_j / same.duration_s:.1f} W")
    print(f"   in-process PowerMeter (child):   {child['energy_j']:10.3f} J ± {child['uncertainty_j']:.3f} J "
          f"over {child['duration_s']:.3f} s, mean {child['mean_power_w']:.1f} W")
    rel = diff_j / child["energy_j"]
    # Both integrate the same NVML sample stream over the same window: they should agree well inside one sigma.
    agree = abs(diff_j) <= max(sigma_j, 1e-9 * abs(child["energy_j"]))  # rounding only, when sigma is 0
    n_sigma = abs(diff_j) / sigma_j if sigma_j > 0 else math.nan
    print(f"   difference {diff_j:+.3f} J ({rel:+.4%}) = {n_sigma:.2f} x the combined uncertainty {sigma_j:.3f} J: "
          f"{'AGREE (within the stated uncertainty)' if agree else 'DISAGREE (outside the stated uncertainty)'}")

    print("\n2. the whole run (start-up, imports, CUDA init, warm-up and the loop)")
    print(f"   {whole.energy_j:.3f} J ± {whole.uncertainty_j:.3f} J over {whole.duration_s:.3f} s; outside the "
          f"measured loop: {whole.energy_j - same.energy_j:.3f} J over {whole.duration_s - same.duration_s:.3f} s")
    if run.cpu is not None:
        print(f"   {run.cpu}")

    _workload_in_process(args, gpu.uuid, child)
    return 0


def _workload_in_process(args: argparse.Namespace, uuid: str, child: dict) -> None:
    from wattscope import PowerMeter

    index = _torch_index(uuid)
    _gemm_loop(2.0, args.size, index)
    with PowerMeter(uuid, name="bench in-process") as m:
        gemms, seconds = _gemm_loop(args.seconds, args.size, index)
    r = m.result
    print("\n3. the same workload again, in this process (a separate run: run-to-run variation is not in the "
          "uncertainties)")
    print(f"   in-process PowerMeter: {r.energy_j:.3f} J ± {r.uncertainty_j:.3f} J over {r.duration_s:.3f} s, "
          f"mean {r.mean_power_w:.1f} W ({gemms} GEMMs, {r.energy_j / gemms * 1e3:.3f} mJ per GEMM); child's "
          f"loop mean {child['mean_power_w']:.1f} W ({(r.mean_power_w / child['mean_power_w'] - 1):+.2%})")


if __name__ == "__main__":
    sys.exit(main())
