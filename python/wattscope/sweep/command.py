"""`wattscope sweep`, `wattscope merge` and `wattscope export`.

Imports nothing heavy at module level: `wattscope --help` must not import torch.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import WattscopeError

_SWEEP_EPILOG = """\
examples:
  wattscope sweep --preset quick                          # ~30 models, bf16, batch 64, on GPU 0
  wattscope sweep --models resnet50,vit_base_patch16_224 --batch-sizes 1,64,256 --precisions fp32,bf16
  wattscope sweep --preset paper --shard 3/8 --db shard3.sqlite   # one task of a Slurm array (docs/sweep_slurm.sbatch)
  wattscope merge all.sqlite shard*.sqlite && wattscope export all.sqlite --csv all.csv

A sweep killed at any point resumes when run again with the same --db: what is stored is skipped.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="measure the inference energy of timm ImageNet models into an SQLite file",
        description="Measure energy per image, throughput and power of timm ImageNet models, one isolated worker "
        "process per model, each (model, configuration) stored as soon as it is measured.",
        epilog=_SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel = p.add_argument_group("which models")
    sel.add_argument(
        "--preset",
        choices=("quick", "paper"),
        help="quick: ~30 models across families and sizes (~10 min on an H100); paper: every model "
        "with an ImageNet result",
    )
    sel.add_argument(
        "--models",
        action="append",
        default=[],
        metavar="NAMES",
        help="names (arch, arch.tag, arch@size) or globs ('convnext*'), comma separated or repeated",
    )
    sel.add_argument(
        "--families",
        action="append",
        default=[],
        metavar="NAMES",
        help="model families (resnet, vit, ...), comma separated or repeated",
    )
    sel.add_argument("--params-min", type=float, metavar="M", help="at least M million parameters")
    sel.add_argument("--params-max", type=float, metavar="M", help="at most M million parameters")
    sel.add_argument("--top-k", type=int, metavar="K", help="the K most accurate of the selection")
    sel.add_argument("--names-file", metavar="PATH", help="a file with one model name per line (# comments)")
    sel.add_argument("--max-units", type=int, metavar="N", help="only the first N selected models")
    cfg = p.add_argument_group("configurations (every combination is measured)")
    cfg.add_argument(
        "--img-size", type=int, metavar="PX", help="input resolution (default: each model's from the catalog)"
    )
    cfg.add_argument("--batch-sizes", type=_int_list, default=(64,), metavar="LIST", help="default 64")
    cfg.add_argument(
        "--precisions",
        type=_str_list,
        default=("bf16",),
        metavar="LIST",
        help="fp32 (TF32 off), tf32, bf16, fp16 (autocast); default bf16",
    )
    cfg.add_argument("--channels-last", choices=("off", "on", "both"), default="off")
    cfg.add_argument("--compile", choices=("off", "on", "both"), default="off", help="torch.compile")
    cfg.add_argument("--cuda-graphs", choices=("off", "on", "both"), default="off")
    run = p.add_argument_group("how")
    run.add_argument(
        "--db",
        default="wattscope-sweep.sqlite",
        metavar="PATH",
        help="results file (default wattscope-sweep.sqlite); rerunning resumes it",
    )
    run.add_argument(
        "--gpus", type=_int_list, default=(0,), metavar="LIST", help="CUDA indices, one worker each (default 0)"
    )
    run.add_argument("--shard", metavar="I/N", help="measure only shard I of N (0 <= I < N), for Slurm job arrays")
    run.add_argument(
        "--target-ci",
        type=float,
        default=0.02,
        metavar="REL",
        help="stop trials when the 95%% CI of energy per image is below this share (default 0.02)",
    )
    run.add_argument("--max-trials", type=int, default=6, metavar="N", help="default 6 (at least min(3, N) are run)")
    run.add_argument(
        "--timeout-s",
        type=float,
        default=600.0,
        metavar="S",
        help="per model configuration; the worker is killed after it (default 600)",
    )
    run.add_argument(
        "--provider",
        choices=("timm", "tiny"),
        default="timm",
        help="where models come from (tiny: small test networks)",
    )
    run.add_argument(
        "--pretrained",
        action="store_true",
        help="load weights from timm's local cache (energy does not depend on them; default random)",
    )
    run.add_argument("--retry-failures", action="store_true", help="measure again what failed in earlier runs")
    run.add_argument("--per-board", action="store_true",
                     help="skip only what the sweep's own GPUs measured before, not what other boards of the same "
                          "model did (default: resume by GPU model, so a job on another node of the same kind "
                          "continues; with --gpus 0,1 a unit done on either is done)")
    run.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: run models on the CPU while metering the GPU (tests of the machinery)",
    )
    run.add_argument("--idle-s", type=float, default=3.0, metavar="S", help="idle-power baseline length (default 3)")
    run.add_argument(
        "--warmup-s", type=float, default=10.0, metavar="S",
        help="longest warm-up per configuration, after its first call (which compiles or captures; default 10)"
    )
    run.add_argument("--dry-run", action="store_true", help="print the work list and exit")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_sweep)

    m = subparsers.add_parser(
        "merge",
        help="combine sweep files (shards, other GPUs) into one",
        description="Copy the rows of sweep files into OUT (created if missing); a result "
        "present in several is kept once. Files of another schema version are "
        "refused.",
    )
    m.add_argument("out", metavar="OUT")
    m.add_argument("inputs", nargs="+", metavar="IN")
    m.set_defaults(run=_merge)

    e = subparsers.add_parser("export", help="write a sweep file's results as CSV and/or Parquet")
    e.add_argument("db", metavar="DB")
    e.add_argument("--csv", metavar="PATH")
    e.add_argument("--parquet", metavar="PATH", help="needs pyarrow")
    e.set_defaults(run=_export)


def _str_list(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} lists nothing")
    return items


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _str_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 1,64") from None


def options_from_args(args: argparse.Namespace):  # -> SweepOptions (runner imported lazily)
    from .runner import SweepOptions

    def flat(values: list[str]) -> tuple[str, ...]:
        return tuple(s for v in values for s in _str_list(v))

    return SweepOptions(
        db_path=args.db,
        preset=args.preset,
        models=flat(args.models),
        families=flat(args.families),
        params_min_m=args.params_min,
        params_max_m=args.params_max,
        top_k=args.top_k,
        names_file=args.names_file,
        img_size=args.img_size,
        batch_sizes=tuple(args.batch_sizes),
        precisions=tuple(args.precisions),
        channels_last=args.channels_last,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        gpus=tuple(args.gpus),
        shard=args.shard,
        target_ci=args.target_ci,
        min_trials=min(3, args.max_trials),
        max_trials=args.max_trials,
        timeout_s=args.timeout_s,
        provider=args.provider,
        pretrained=args.pretrained,
        max_units=args.max_units,
        device=args.device,
        idle_s=args.idle_s,
        warmup_s=args.warmup_s,
        retry_failures=args.retry_failures,
        per_board=args.per_board,
        command=shlex.join(["wattscope", *sys.argv[1:]]),
        progress=not args.quiet,
    )


def _error(command: str, e: object) -> None:
    print(f"wattscope {command}: error: {e}", file=sys.stderr)


def _sweep(args: argparse.Namespace) -> int:
    from .catalog import UnknownModelError
    from .runner import SweepOptionsError, run_sweep

    try:
        options = options_from_args(args)
    except ValueError as e:  # a bad value on the command line: nothing was measured
        _error("sweep", e)
        return 2
    try:
        if args.dry_run:
            return _dry_run(options)
        summary = run_sweep(options)
    except (SweepOptionsError, UnknownModelError) as e:  # bad options, unknown models, an unusable --db
        _error("sweep", e)
        return 2
    except WattscopeError as e:
        _error("sweep", e)
        return 1
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary.failures_by_kind.items()))
    lines = [
        f"{summary.measured} measured, {summary.failed} failed{f' ({kinds})' if kinds else ''}, "
        f"{summary.skipped} already in {summary.db_path} (of {summary.planned} planned) "
        f"in {summary.wall_s:.0f} s"
    ]
    if summary.median_item_wall_s is not None:
        share = f", {summary.measure_share:.0%} of it measuring" if summary.measure_share is not None else ""
        lines.append(f"median {summary.median_item_wall_s:.1f} s per model configuration{share}")
    print("\n".join(lines))
    return 130 if summary.interrupted else 0


def _dry_run(options) -> int:  # options: SweepOptions
    from .runner import validate
    from .store import SweepStore

    plan = validate(options, check_gpus=False)
    done: set[tuple[str, str]] = set()
    if Path(options.db_path).is_file():
        with SweepStore(options.db_path, read_only=True) as store:
            done = store.done_keys(retry_failures=options.retry_failures)
    shard = f" (shard {plan.shard[0]}/{plan.shard[1]} of {plan.total_items})" if plan.shard else ""
    pending = [it for it in plan.items if it.key not in done]
    for it in pending:
        print(f"{it.unit.key}\t{it.config.key}")
    print(
        f"{len(pending)} to measure, {len(plan.items) - len(pending)} already in {options.db_path}, "
        f"{len(plan.units)} models{shard}",
        file=sys.stderr,
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .store import merge

    try:
        report = merge(args.out, args.inputs)
    except (ValueError, WattscopeError) as e:
        _error("merge", e)
        return 2
    print(
        f"{report.out_path}: +{report.results_added} results ({report.results_duplicate} duplicates kept once), "
        f"+{report.failures_added} failures, +{report.runs_added} runs from {len(report.inputs)} files; "
        f"{len(report.gpu_uuids)} GPUs in all"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .store import SweepStore

    if not args.csv and not args.parquet:
        _error("export", "give --csv PATH and/or --parquet PATH")
        return 2
    try:
        with SweepStore(args.db, read_only=True) as store:
            written = []
            if args.csv:
                written.append(store.export_csv(args.csv))
            if args.parquet:
                written.append(store.export_parquet(args.parquet))
    except (ValueError, WattscopeError, ModuleNotFoundError, OSError) as e:
        _error("export", e)
        return 2
    print("wrote " + ", ".join(map(str, written)))
    return 0
