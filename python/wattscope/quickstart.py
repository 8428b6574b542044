"""`wattscope quickstart`: the main job in one command.

On a machine that can measure (an NVIDIA GPU NVML can read, torch with CUDA, timm), it sweeps the quick preset of
timm models into a database and serves the results; anywhere else it says what is missing and serves the H100
results shipped with wattscope, so the command is useful on a laptop too. It only chains public commands
(``wattscope sweep``, ``wattscope serve``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from .errors import WattscopeError

# One configuration per model: the shipped H100 data has it for every model of the preset.
_SWEEP_ARGS = ("--preset", "quick", "--batch-sizes", "64", "--precisions", "bf16", "--channels-last", "on")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="measure timm's quick preset on this GPU and serve the results (elsewhere: serve the shipped H100 "
        "results)",
        description="On a GPU machine with torch and timm: `wattscope sweep " + " ".join(_SWEEP_ARGS) + " --db DB` "
        "(~7 min on an H100; resumable: run it again to continue), then `wattscope serve DB`. Without a usable GPU, "
        "torch or timm: says which is missing and serves the H100 results shipped with wattscope.",
    )
    p.add_argument("--db", default="wattscope-sweep.sqlite", help="where the sweep writes (default: %(default)s)")
    p.add_argument("--port", type=int, default=8050, help="port of the web app (default 8050)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument("--no-serve", action="store_true", help="stop after the sweep (or the check)")
    p.set_defaults(run=_run)


def why_not_measure() -> str | None:
    """None when this machine can run the sweep, else what is missing (one sentence)."""
    for module, extra in (("torch", "sweep"), ("timm", "sweep")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'wattscope[{extra}]')"
    try:
        from . import list_gpus

        gpus = list_gpus()
    except WattscopeError as e:
        return f"no GPU power readings here: {e}"
    if not gpus:
        return "NVML sees no GPU"
    import torch

    # Not torch.cuda.is_available(): that initialises CUDA in this process, which the sweep's workers must own.
    if not torch.backends.cuda.is_built():
        return "this torch is a CPU build (install a CUDA build of torch)"
    try:
        import timm  # noqa: F401  (timm imports torchvision, which fails where it has no build for this torch)
    except Exception as e:  # any import failure of a third-party stack means the same: cannot sweep here
        return f"timm does not import ({type(e).__name__}: {e})"
    return None


def _run(args: argparse.Namespace) -> int:
    from .cli import main

    missing = why_not_measure()
    serve_args = ["serve", "--port", str(args.port)] + (["--no-browser"] if args.no_browser else [])
    if missing is not None:
        then = "" if args.no_serve else " Serving the H100 results shipped with wattscope instead."
        print(f"wattscope quickstart: not measuring: {missing}.{then}", file=sys.stderr, flush=True)
        return 0 if args.no_serve else main(serve_args)
    print(f"wattscope quickstart: sweeping into {args.db} (Ctrl-C stops cleanly; run again to resume)",
          file=sys.stderr, flush=True)
    status = main(["sweep", *_SWEEP_ARGS, "--db", args.db])
    if status != 0 or args.no_serve:  # 130: Ctrl-C, which means stop here (the rows so far are kept)
        return status
    return main([*serve_args, args.db])
