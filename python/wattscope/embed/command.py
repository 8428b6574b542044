"""`wattscope run [options] -- <command> [args]`: measure the GPUs (and the CPU) while a command runs.

Exit status: the command's own (128 + N when signal N ended it, as a shell reports it); 127 when it is not found and
126 when it cannot be executed, like a shell; 125 when wattscope itself fails (no GPU to measure, a bad device, a
results file it cannot write) and the command did not fail first, like timeout(1); 2 for bad options.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import signal
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..devices import DeviceSelector
from ..errors import WattscopeError
from ..files import write_atomic
from ..measurement import rows_to_csv
from ..rapl import POWERCAP_ROOT
from .results_file import WHOLE_DEVICE_NOTE, write_results

if TYPE_CHECKING:  # runner imports the meter and, through it, the native core: only when a command runs
    from .runner import RunResult, SignalForwarder

EXIT_WATTSCOPE_FAILED = 125
_TOP_KERNELS = 10

_EPILOG = """\
examples:
  wattscope run -- python train.py --epochs 1
  wattscope run --devices 0,1 -o run.json --repeat 5 -- ./bench.sh        # 5 trials, for wattscope compare
  wattscope run --kernels --interval-s 1 -o run.csv -- python infer.py   # energy per kernel, per second

The energy is whole-device: every process using the measured GPUs while the command runs counts.
--kernels traces the kernels of Python processes only (a sitecustomize put first on PYTHONPATH starts wattscope's
tracer in each); other commands get energy alone, and the summary says so.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="measure GPU (and CPU) energy while a command runs; its exit status passes through",
        description="Run a command and measure the energy of the GPUs (whole device) and, where RAPL is readable, "
        "of the CPU packages and DRAM, from just before it starts until it exits. Signals sent to wattscope are "
        "forwarded to the command.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices", type=_devices, default=None, metavar="SEL",
                   help="GPUs to measure: CUDA indices (0,1), UUIDs or bus ids, comma separated, or 'all' "
                   "(default: every GPU visible to CUDA)")
    p.add_argument("--kernels", action="store_true",
                   help="trace the kernels of the Python processes under the command and attribute energy to them")
    p.add_argument("-o", "--output", type=_output, metavar="PATH",
                   help="write the results: .json (a results file for wattscope compare) or .csv")
    p.add_argument("--interval-s", type=_positive, metavar="S",
                   help="also report the energy of every S-second interval (JSON 'intervals'; CSV: one row each)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the command N times, one trial each (stops at the first failure; default 1)")
    p.add_argument("--name", help="the region name in the results (default: the command line)")
    p.add_argument("--no-cpu", dest="cpu", action="store_false", help="do not read RAPL")
    p.add_argument("--rapl-root", default=str(POWERCAP_ROOT), metavar="DIR",
                   help=f"where the powercap zones are (default {POWERCAP_ROOT})")
    p.add_argument("-q", "--quiet", action="store_true", help="print no summary")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(run=_run)


def parse_devices(text: str) -> DeviceSelector:
    """A command line's device selection ("0,1", a UUID, a bus id, "all") as a PowerMeter ``devices`` argument."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{text!r} names no GPU: give CUDA indices (0,1), UUIDs or bus ids, or 'all'")
    if items == ["all"]:
        return "all"
    parsed = [int(t) if t.isdigit() else t for t in items]
    return parsed[0] if len(parsed) == 1 else parsed


def _devices(text: str) -> DeviceSelector:
    try:
        return parse_devices(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _output(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".json", ".csv"):
        raise argparse.ArgumentTypeError(f"{text}: the output must end in .json or .csv")
    # Checked before the command runs: a long run whose results cannot be written is lost.
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the directory {path.absolute().parent} does not exist")
    return path


def _positive(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _run(args: argparse.Namespace) -> int:
    from .runner import SignalForwarder

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("wattscope run: no command given; usage: wattscope run [options] -- <command> [args]", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("wattscope run: --repeat must be at least 1", file=sys.stderr)
        return 2
    # The handlers stay in place for the whole run, between trials and while the results are written too: a
    # SIGTERM there stops the repeats and the trials so far are still written.
    with SignalForwarder() as signals:
        return _trials(args, command, signals)


def _trials(args: argparse.Namespace, command: list[str], signals: SignalForwarder) -> int:
    from .runner import CommandStartError, run_command

    results: list[RunResult] = []
    for trial in range(args.repeat):
        if signals.pending is not None:
            break
        try:
            r = run_command(command, devices=args.devices, name=args.name, kernels=args.kernels,
                            interval_s=args.interval_s, cpu=args.cpu, rapl_root=args.rapl_root, signals=signals)
        except CommandStartError as e:
            print(f"wattscope run: {e}", file=sys.stderr)
            return e.exit_code
        except (WattscopeError, ValueError) as e:
            print(f"wattscope run: {e}", file=sys.stderr)
            child = getattr(e, "child_exit_code", None)
            return child if child else EXIT_WATTSCOPE_FAILED
        results.append(r)
        if not args.quiet:
            print(_summary(r, trial if args.repeat > 1 else None), file=sys.stderr)
        if r.exit_code != 0:
            break
    if not results:  # a signal came before the first command started
        return _signal_status(signals)
    if args.repeat > 1 and len(results) > 1 and not args.quiet:
        energies = [r.measurement.energy_j for r in results]
        print(f"wattscope run: {len(results)} trials, GPU energy {statistics.mean(energies):.3f} J "
              f"± {statistics.stdev(energies):.3f} J (sd)", file=sys.stderr)
    exit_code = results[-1].exit_code
    if signals.pending is not None and len(results) < args.repeat and exit_code == 0:
        print(f"wattscope run: {signal.Signals(signals.pending).name} received between trials: stopped after "
              f"{len(results)} of {args.repeat}", file=sys.stderr)
    if args.output is not None:
        try:
            _write(args.output, results, command, args.name)
        except OSError as e:
            print(f"wattscope run: could not write {args.output}: {e.strerror or e}", file=sys.stderr)
            return exit_code or _signal_status(signals) or EXIT_WATTSCOPE_FAILED
        if not args.quiet:
            print(f"wattscope run: wrote {args.output}", file=sys.stderr)
    return exit_code or _signal_status(signals)


def _signal_status(signals: SignalForwarder) -> int:
    """128 + N for a signal N that came while no command ran (what a shell reports for a process it ended), else 0."""
    return 0 if signals.pending is None else 128 + signals.pending


def _summary(r: RunResult, trial: int | None) -> str:
    m = r.measurement
    shown = shlex.join(r.command)
    shown = shown if len(shown) <= 100 else shown[:97] + "..."
    head = (f"wattscope run{f' (trial {trial + 1})' if trial is not None else ''}: `{shown}` exited "
            f"with {r.exit_code} after {m.duration_s:.3f} s")
    if r.signals_forwarded:
        head += f" (signals: {', '.join(r.signals_forwarded)})"
    lines = [head, f"  [{WHOLE_DEVICE_NOTE}]"]
    lines += ["  " + line for line in str(dataclasses.replace(m, name="GPUs")).splitlines()]
    lines += [f"  uncertainty: {reason}" for reason in m.uncertainty_reasons[:3]]
    if r.cpu is not None:
        lines.append("  " + str(r.cpu))
    if r.intervals:
        peak = max(r.intervals, key=lambda w: w.energy_j)
        lines.append(f"  {len(r.intervals)} intervals; the largest: {peak.energy_j:.3f} J over {peak.duration_s:.3f} s")
    if r.kernels is not None:
        k = r.kernels
        lines.append(f"  kernels: {k.processes} Python process(es) traced")
        for gpu, rows in k.rows.items():
            lines.append(f"  {gpu} energy per kernel ({k.methods[gpu]}):")
            lines.append(f"    {'energy_j':>10} {'share':>6} {'calls':>7} {'time_s':>9}  name")
            for row in rows[:_TOP_KERNELS]:
                lines.append(f"    {row.energy_j:10.3f} {row.share:6.1%} {row.calls:7d} {row.time_s:9.4f}  "
                             f"{row.name[:70]}")
            if len(rows) > _TOP_KERNELS:
                lines.append(f"    ... {len(rows) - _TOP_KERNELS} more rows in the -o output")
        lines += [f"  kernels: {note}" for note in k.notes]
    return "\n".join(lines)


def _write(path: Path, results: list[RunResult], command: list[str], name: str | None) -> None:
    region = name or shlex.join(command)
    if path.suffix.lower() == ".csv":
        rows: list[dict[str, object]] = []
        for i, r in enumerate(results):
            if r.intervals:
                rows += [{"trial": i, "interval": k, **w.to_dict()} for k, w in enumerate(r.intervals)]
            else:
                rows.append({"trial": i, **r.to_trial()})
        write_atomic(path, rows_to_csv(rows))
        return
    runs = []
    for r in results:
        run: dict[str, object] = {
            "exit_code": r.exit_code,
            "signals_forwarded": list(r.signals_forwarded),
            "uncertainty_reasons": list(r.measurement.uncertainty_reasons),
            "errors": list(r.measurement.errors),
        }
        if r.intervals:
            run["intervals"] = [w.to_dict() for w in r.intervals]
        if r.kernels is not None:
            run["kernels"] = {gpu: [dataclasses.asdict(row) for row in rows] for gpu, rows in r.kernels.rows.items()}
            run["kernel_methods"] = r.kernels.methods
            run["kernel_notes"] = list(r.kernels.notes)
        runs.append(run)
    write_results(path, {region: [r.to_trial() for r in results]}, tool="wattscope run", command=command,
                  exit_code=results[-1].exit_code, runs=runs)
