"""The sweep: which (unit, configuration) pairs to measure, on which GPUs, resumed where a previous run stopped.

``run_sweep(options)``:

1. ``validate`` checks every option before any GPU time is spent (models against the catalog and the provider,
   batch sizes, precisions, the shard, the database path, the GPUs) and returns the plan: the work list, every
   (unit, configuration) in a fixed order (sorted by unit key, then configuration key), cut to this shard.
2. The store is opened; what it already holds for GPUs of the same model as the sweep's (results, and failures
   unless ``retry_failures``) is skipped, so a sweep killed at any moment and run again, on this node or on
   another of the same kind, loses and duplicates nothing (``per_board``: skip only what these very boards did).
3. With nothing running, each GPU's idle power is measured (three windows, so it has a confidence interval); its
   readings also give the driver version and the sensor's sample period, which with the sensor's response (from a
   calibration profile, else a default) give the measurement protocol's window length and phase offsets.
4. One thread per GPU takes units from a shared queue and measures each in its own worker process
   (``worker.run_job``); outcomes come back to this thread, the only writer, which stores each as it arrives and
   draws the progress line.

Shards (``--shard i/n``, for Slurm job arrays): item ``j`` of the full sorted work list belongs to shard
``j mod n``, so shards are disjoint, cover the list, stay stable when a sweep is resumed, and mix large and small
models. Several GPUs (``--gpus 0,1``) split one shard's units between them; a (unit, configuration) done on any of
them counts as done (use GPUs of one model in one sweep).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import math
import os
import queue
import signal
import socket
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from ..errors import WattscopeError
from .catalog import Catalog, Unit, UnknownModelError
from .measure import ConfigResult, MeasureSettings
from .providers import PROVIDER_NAMES, ModelProvider, get_provider
from .store import PRECISIONS, Config, FailureRow, ResultRow, RunInfo, SweepStore
from .worker import Failure, WorkerJob, run_job

DEFAULT_DB = "wattscope-sweep.sqlite"
SWITCHES = ("off", "on", "both")
DEVICES = ("cuda", "cpu")
_GLOB_CHARS = frozenset("*?[")
_IDLE_WINDOWS = 3
class SweepOptionsError(WattscopeError, ValueError):
    """An option of the sweep is invalid; raised before any GPU time is spent."""


@dataclass(frozen=True)
class SweepOptions:
    """Everything a sweep needs; the CLI builds one from its flags (``wattscope sweep --help`` documents them)."""

    db_path: str = DEFAULT_DB
    preset: str | None = None
    models: tuple[str, ...] = ()  # names (arch, arch.tag, arch@size) and globs (with * ? [)
    families: tuple[str, ...] = ()
    params_min_m: float | None = None
    params_max_m: float | None = None
    top_k: int | None = None
    names_file: str | None = None
    img_size: int | None = None  # measure at this input size instead of each unit's catalog size
    batch_sizes: tuple[int, ...] = (64,)
    precisions: tuple[str, ...] = ("bf16",)
    channels_last: str = "off"  # "off", "on" or "both"
    compile: str = "off"
    cuda_graphs: str = "off"
    gpus: tuple[int, ...] = (0,)  # CUDA indices
    shard: str | None = None  # "i/n", 0 <= i < n
    target_ci: float = 0.02  # relative 95 % CI half-width of energy per image at which trials stop
    min_trials: int = 3
    # Small batches bound by the host's launches vary more than 2 % between trials; capping trials bounds the wall
    # time of such a configuration (its row records the interval it reached).
    max_trials: int = 6
    timeout_s: float = 600.0  # per configuration (the model's build gets as much again)
    provider: str = "timm"
    pretrained: bool = False
    max_units: int | None = None  # only the first N selected units
    device: str = "cuda"  # "cpu" runs the models on the CPU while metering the GPUs (tests)
    idle_s: float = 3.0  # idle-power baseline per GPU
    warmup_s: float = 10.0  # cap on warm-up per configuration, after its first (compiling, capturing) call
    retry_failures: bool = False  # measure again what failed before
    # Skip only what this very board measured, not what another GPU of the same model did (board-to-board studies).
    per_board: bool = False
    command: str = ""  # the command line, recorded with the run
    progress: bool = True  # the progress line on stderr


@dataclass(frozen=True)
class WorkItem:
    unit: Unit
    config: Config

    @property
    def key(self) -> tuple[str, str]:
        return (self.unit.key, self.config.key)


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep will measure: this shard's work list and the GPUs (empty when they were not checked)."""

    units: tuple[Unit, ...]
    items: tuple[WorkItem, ...]
    total_items: int  # in the whole work list, every shard
    shard: tuple[int, int] | None
    gpus: tuple[Any, ...]  # wattscope.GpuInfo


@dataclass(frozen=True)
class SweepSummary:
    """What ``run_sweep`` did. ``measure_share`` is the share of the results' wall time spent in measured trials."""

    db_path: str
    run_ids: tuple[str, ...]
    planned: int  # items in this shard's work list
    skipped: int  # already in the store
    measured: int
    failed: int
    failures_by_kind: dict[str, int]
    interrupted: bool
    wall_s: float
    median_item_wall_s: float | None
    measure_share: float | None


# -- validation -----------------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise SweepOptionsError(
            f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4 (Slurm: "
            "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT} with --array=0-3)"
        )
    return i, n


def switch_values(name: str, value: str) -> tuple[bool, ...]:
    """``off``/``on``/``both`` -> the flag values to sweep."""
    if value not in SWITCHES:
        raise SweepOptionsError(f"{name} {value!r}: choose one of {', '.join(SWITCHES)}")
    return {"off": (False,), "on": (True,), "both": (False, True)}[value]


def validate(options: SweepOptions, *, check_gpus: bool = True) -> SweepPlan:
    """Check every option and compute the work list; raises ``SweepOptionsError`` (or the catalog's
    ``UnknownModelError``, both ValueErrors) with what to change. ``check_gpus=False`` (a dry run) leaves out what
    needs the GPUs and their driver."""
    _check_numbers(options)
    shard = parse_shard(options.shard) if options.shard is not None else None
    flags = [
        switch_values(f"--{name.replace('_', '-')}", getattr(options, name))
        for name in ("channels_last", "compile", "cuda_graphs")
    ]
    if options.device not in DEVICES:
        raise SweepOptionsError(f"device {options.device!r}: choose one of {', '.join(DEVICES)}")
    if options.device == "cpu" and True in flags[2]:
        raise SweepOptionsError("--cuda-graphs needs --device cuda: CUDA graphs cannot run on the CPU")
    _check_db_path(Path(options.db_path))
    provider = _provider(options.provider)
    units = _select_units(options, provider)
    missing = provider.unknown(sorted({u.architecture for u in units} - set(provider.special_architectures())))
    if missing:
        raise SweepOptionsError(
            f"the {provider.name} provider cannot build {len(missing)} selected model(s): {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}. Upgrade it (installed: {provider.versions()}) or leave them out."
        )
    items = sorted(
        (
            WorkItem(u, Config(bs, precision, cl, comp, graphs, u.img_size))
            for u in units
            for bs in options.batch_sizes
            for precision in options.precisions
            for cl in flags[0]
            for comp in flags[1]
            for graphs in flags[2]
        ),
        key=lambda it: it.key,
    )
    total = len(items)
    if shard is not None:
        items = [it for j, it in enumerate(items) if j % shard[1] == shard[0]]
    gpus = _check_gpus(options) if check_gpus else ()
    return SweepPlan(tuple(units), tuple(items), total, shard, gpus)


def _check_numbers(options: SweepOptions) -> None:
    problems = []
    if not options.batch_sizes:
        problems.append("no batch size given")
    problems += [
        f"batch size {b} is not a positive integer"
        for b in options.batch_sizes
        if isinstance(b, bool) or not isinstance(b, int) or b < 1
    ]
    if not options.precisions:
        problems.append("no precision given")
    problems += [
        f"unknown precision {p!r} (choose from {', '.join(PRECISIONS)})"
        for p in options.precisions
        if p not in PRECISIONS
    ]
    if not 0 < options.target_ci < 1:
        problems.append(f"--target-ci {options.target_ci} must be between 0 and 1 (0.02 = 2 %)")
    if not 2 <= options.min_trials <= options.max_trials:
        problems.append(f"need 2 <= min trials ({options.min_trials}) <= --max-trials ({options.max_trials})")
    for name in ("timeout_s", "idle_s", "warmup_s"):
        value = getattr(options, name)
        if not (math.isfinite(value) and value > 0):
            problems.append(f"--{name.replace('_', '-')} {value} must be a positive number of seconds")
    for name in ("img_size", "max_units", "top_k"):
        value = getattr(options, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} {value} must be at least 1")
    if not options.gpus:
        problems.append("no GPU given")
    problems += [f"GPU index {g} is negative" for g in options.gpus if g < 0]
    if len(set(options.gpus)) != len(options.gpus):
        problems.append(f"--gpus {','.join(map(str, options.gpus))} names a GPU twice")
    if problems:
        raise SweepOptionsError("invalid sweep options: " + "; ".join(problems))


def _check_db_path(path: Path) -> None:
    if path.is_dir():
        raise SweepOptionsError(f"--db {path} is a directory; give a file name, e.g. {path / DEFAULT_DB}")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SweepOptionsError(f"--db {path} is not writable; choose another file or fix its permissions")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the store creates the missing folders
    if not folder.is_dir():
        raise SweepOptionsError(f"--db {path}: {folder} is a file, not a folder; choose another location")
    # SQLite writes -wal and -shm files beside the database, so its folder must be writable too.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SweepOptionsError(f"--db {path}: the folder {folder} is not writable; choose a writable location")


def _provider(name: str) -> ModelProvider:
    try:
        provider = get_provider(name)
    except ValueError as e:
        raise SweepOptionsError(f"--provider {name!r}: choose one of {', '.join(PROVIDER_NAMES)}") from e
    why = provider.available()
    if why is not None:
        raise SweepOptionsError(f"the {name} model provider cannot be used here: {why}")
    return provider


def _select_units(options: SweepOptions, provider: ModelProvider) -> list[Unit]:
    special = provider.special_architectures()
    globs = [m for m in options.models if _GLOB_CHARS & set(m)]
    names = [m for m in options.models if m not in globs and m not in special]
    own = [m for m in options.models if m in special]
    units: list[Unit] = []
    filtered = (
        names
        or globs
        or options.families
        or options.preset
        or options.names_file
        or options.top_k
        or options.params_min_m is not None
        or options.params_max_m is not None
    )
    if filtered or not own:
        catalog = Catalog.load()
        try:
            units = catalog.select(
                preset=options.preset,
                names=names,
                globs=globs,
                families=options.families,
                params_m=(options.params_min_m, options.params_max_m),
                top_k=options.top_k,
                names_file=options.names_file,
            )
        except UnknownModelError:
            raise
        except (ValueError, OSError) as e:
            raise SweepOptionsError(f"model selection: {e}") from e
        if options.img_size is not None:
            units = _at_size(catalog, units, options.img_size)
    size = options.img_size or 224
    units += [Unit(name, size, provider.name, None, None, None, None, None, None, ()) for name in own]
    if options.max_units is not None:
        units = units[: options.max_units]
    return units


def _at_size(catalog: Catalog, units: Sequence[Unit], img_size: int) -> list[Unit]:
    """The units' architectures at another input size: the catalog's unit at that size if it has one, else the
    unit moved to it (without its weights, whose accuracies were measured at the catalog size)."""
    out: dict[str, Unit] = {}
    for u in units:
        try:
            moved = catalog.get(u.architecture, img_size)
        except UnknownModelError:
            moved = dataclasses.replace(u, img_size=img_size, weights=())
        out.setdefault(moved.key, moved)
    return list(out.values())


def _check_gpus(options: SweepOptions) -> tuple[Any, ...]:
    from .. import list_gpus

    gpus = list_gpus()
    by_cuda = {g.cuda_index: g for g in gpus if g.cuda_index is not None}
    missing = [i for i in options.gpus if i not in by_cuda]
    if missing:
        listing = (
            "\n".join(f"  cuda:{g.cuda_index if g.cuda_index is not None else '-'}  {g.name}  {g.uuid}" for g in gpus)
            or "  (NVML reports no GPU)"
        )
        raise SweepOptionsError(
            f"--gpus: no CUDA device {', '.join(map(str, missing))} on this machine "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). GPUs:\n{listing}"
        )
    if options.device == "cuda":
        import torch

        if not torch.backends.cuda.is_built():
            raise SweepOptionsError(
                f"torch {torch.__version__} was built without CUDA: install a CUDA build of torch "
                "(or use --device cpu to test the sweep machinery)"
            )
    return tuple(by_cuda[i] for i in options.gpus)


# -- the idle baseline and the protocol -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleBaseline:
    power_w: float
    ci95_w: float
    driver_version: str
    sample_period_ns: float
    source: str


def measure_idle(gpus: Sequence[Any], seconds: float) -> dict[str, IdleBaseline]:
    """Each GPU's power with nothing running, over ``seconds`` split into three windows (for the interval)."""
    from .. import PowerMeter
    from .measure import ci95_half_width

    powers: dict[str, list[float]] = {g.uuid: [] for g in gpus}
    periods: dict[str, list[float]] = {g.uuid: [] for g in gpus}
    sources: dict[str, str] = {}
    # strict: a NaN idle power would make every above-idle figure of the sweep NaN.
    meter = PowerMeter([g.uuid for g in gpus], name="idle", strict=True)
    for _ in range(_IDLE_WINDOWS):
        with meter:
            time.sleep(seconds / _IDLE_WINDOWS)
        r = meter.result
        for g in r.gpus:
            powers[g.uuid].append(g.energy_j / r.duration_s)
            sources[g.uuid] = g.source
            if g.sample_period_s:
                periods[g.uuid].append(g.sample_period_s * 1e9)
            elif len(g.t_ns) > 1:
                periods[g.uuid].append(float(statistics.median(list(map(float, g.t_ns[1:] - g.t_ns[:-1])))))
    driver = {t.uuid: t.driver_version for t in meter.traces}
    return {
        u: IdleBaseline(
            statistics.mean(p),
            ci95_half_width(p),
            driver.get(u, ""),
            statistics.median(periods[u]) if periods[u] else 20e6,
            sources[u],
        )
        for u, p in powers.items()
    }


def sensor_response(gpu_name: str, driver_version: str) -> tuple[Any, str]:
    """The sensor response that sizes the protocol, and where it came from: the one every measurement uses
    (wattscope.sensor), or, for a GPU nothing is known about, a 100 ms boxcar (the slowest averaging the literature
    reports for fields NVML refreshes every 100 ms), so windows come out long enough whatever the sensor."""
    from ..response import Response
    from ..sensor import sensor_model

    model = sensor_model(gpu_name, driver_version)
    if model.best_source is not None and model.best_source != "samples":
        model = sensor_model(gpu_name, driver_version, model.best_source)
    if model.response is not None:
        return model.response, model.origin
    return Response("boxcar", 100e6, 0.0), "conservative default (boxcar 100 ms): run `wattscope calibrate`"


def _settings(options: SweepOptions, gpu: Any, idle: IdleBaseline) -> tuple[MeasureSettings, dict[str, Any]]:
    import numpy as np

    from ..calibration.protocol import plan

    response, origin = sensor_response(gpu.name, idle.driver_version)
    protocol = plan(
        response,
        idle.sample_period_ns,
        target_rel_uncertainty=options.target_ci,
        repetitions=options.max_trials,
        rng=np.random.default_rng(),
    )
    settings = MeasureSettings(
        device=options.device,
        meter_device=gpu.uuid,
        idle_power_w=idle.power_w,
        window_s=protocol.window_s,
        offsets_s=tuple(protocol.offsets_s),
        target_ci=options.target_ci,
        min_trials=options.min_trials,
        max_trials=options.max_trials,
        warmup_block_s=min(0.2, options.warmup_s / 10),
        warmup_cap_s=options.warmup_s,
    )
    record = {
        "window_s": protocol.window_s,
        "reason": protocol.reason,
        "response": origin,
        "sample_period_ns": idle.sample_period_ns,
        "idle_source": idle.source,
    }
    return settings, record


# -- running --------------------------------------------------------------------------------------------------------


def run_sweep(options: SweepOptions, *, stream: IO[str] | None = None) -> SweepSummary:
    """Validate, then measure every pending item of the plan; see the module docstring. Ctrl-C (or SIGTERM, when
    called from the main thread) stops cleanly: workers are killed, what was measured is kept, and the summary says
    ``interrupted``."""
    t0 = time.monotonic()
    plan = validate(options)
    stream = stream if stream is not None else sys.stderr
    with SweepStore(options.db_path) as store:
        done: set[tuple[str, str]] = set()
        for g in plan.gpus:
            boards = {g.uuid} if options.per_board else {g.uuid} | store.gpus_of_model(g.name)
            for uuid in sorted(boards):
                done |= store.done_keys(uuid, retry_failures=options.retry_failures)
        pending = [it for it in plan.items if it.key not in done]
        skipped = len(plan.items) - len(pending)
        if not pending:
            return SweepSummary(
                str(options.db_path), (), len(plan.items), skipped, 0, 0, {}, False, time.monotonic() - t0, None, None
            )
        idle = measure_idle(plan.gpus, options.idle_s)
        runs: dict[str, str] = {}
        settings: dict[str, MeasureSettings] = {}
        for g in plan.gpus:
            settings[g.uuid], protocol = _settings(options, g, idle[g.uuid])
            runs[g.uuid] = _start_run(store, options, g, idle[g.uuid], protocol)
        progress = _Progress(len(pending), len(plan.gpus), stream, options.progress)
        outcomes, interrupted = _execute(options, plan.gpus, pending, settings, runs, store, progress)
    results = [o for o in outcomes if isinstance(o, ConfigResult)]
    failures = Counter(o.kind for o in outcomes if isinstance(o, Failure))
    walls = [o.wall_s for o in outcomes]
    wall_results = sum(r.wall_s for r in results)
    return SweepSummary(
        db_path=str(options.db_path),
        run_ids=tuple(runs.values()),
        planned=len(plan.items),
        skipped=skipped,
        measured=len(results),
        failed=sum(failures.values()),
        failures_by_kind=dict(failures),
        interrupted=interrupted,
        wall_s=time.monotonic() - t0,
        median_item_wall_s=statistics.median(walls) if walls else None,
        measure_share=sum(r.measure_s for r in results) / wall_results if wall_results > 0 else None,
    )


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _start_run(store: SweepStore, options: SweepOptions, gpu: Any, idle: IdleBaseline, protocol: dict[str, Any]) -> str:
    from .. import __version__

    run_id = uuid.uuid4().hex
    record = dataclasses.asdict(options) | {"protocol": protocol}
    store.start_run(
        RunInfo(
            run_id=run_id,
            started_utc=_utc_now(),
            host=socket.gethostname(),
            gpu_name=gpu.name,
            gpu_uuid=gpu.uuid,
            driver_version=idle.driver_version,
            cuda_version=_cuda_version(),
            torch_version=_version("torch"),
            timm_version=get_provider(options.provider).versions().get("timm"),
            wattscope_version=__version__,
            command=options.command or f"run_sweep({options!r})",
            options_json=json.dumps(record, sort_keys=True),
        )
    )
    store.add_idle(run_id, gpu.uuid, idle.power_w, idle.ci95_w, _utc_now())
    return run_id


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version() -> str | None:
    import torch

    return torch.version.cuda


def _execute(
    options: SweepOptions,
    gpus: Sequence[Any],
    pending: list[WorkItem],
    settings: dict[str, MeasureSettings],
    runs: dict[str, str],
    store: SweepStore,
    progress: _Progress,
) -> tuple[list[ConfigResult | Failure], bool]:
    jobs: queue.Queue[tuple[Unit, tuple[Config, ...]]] = queue.Queue()
    for unit, items in itertools.groupby(pending, key=lambda it: it.unit):
        jobs.put((unit, tuple(it.config for it in items)))
    events: queue.Queue[tuple[Any, ...]] = queue.Queue()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_gpu_loop,
            args=(options, g, settings[g.uuid], jobs, events, stop),
            name=f"wattscope-sweep cuda:{g.cuda_index}",
        )
        for g in gpus
    ]
    outcomes: list[ConfigResult | Failure] = []
    interrupted = False
    gpu_index = {g.uuid: i for i, g in enumerate(gpus)}
    previous_term = _term_as_interrupt()
    try:
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                progress.draw()
                continue
            kind, gpu = event[0], event[1]
            if kind == "exit":
                running -= 1
                if event[2] is not None:
                    raise event[2]
            elif kind == "begin":
                progress.begin(gpu_index[gpu.uuid], event[2], event[3])
            elif kind == "power":
                progress.power(gpu_index[gpu.uuid], event[2])
            else:
                outcomes.append(_store(store, runs[gpu.uuid], gpu, event[2], event[3], options))
                progress.finished(event[2], event[3])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        for t in threads:
            t.join()
        # Outcomes that arrived while stopping are whole measurements: keep them.
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "outcome":
                outcomes.append(_store(store, runs[event[1].uuid], event[1], event[2], event[3], options))
        progress.close(interrupted)
        if previous_term is not _NOT_INSTALLED:
            signal.signal(signal.SIGTERM, previous_term)
    return outcomes, interrupted


_NOT_INSTALLED = object()


def _term_as_interrupt() -> Any:
    """Turn SIGTERM (Slurm's time limit, scancel) into KeyboardInterrupt while the sweep runs in the main thread;
    returns the handler to restore (``_NOT_INSTALLED`` when none was installed)."""
    if threading.current_thread() is not threading.main_thread():
        return _NOT_INSTALLED

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return signal.SIG_DFL if previous is None else previous  # None: a handler set outside Python


def _gpu_loop(
    options: SweepOptions,
    gpu: Any,
    settings: MeasureSettings,
    jobs: queue.Queue[tuple[Unit, tuple[Config, ...]]],
    events: queue.Queue[tuple[Any, ...]],
    stop: threading.Event,
) -> None:
    error: BaseException | None = None
    try:
        while not stop.is_set():
            try:
                unit, configs = jobs.get_nowait()
            except queue.Empty:
                break
            job = WorkerJob(
                unit.key,
                unit.architecture,
                configs,
                options.provider,
                options.pretrained,
                settings,
                gpu.uuid if options.device == "cuda" else None,
            )

            def begin(config: Config, unit: Unit = unit) -> None:
                events.put(("begin", gpu, unit, config))

            def power(power_w: float) -> None:
                events.put(("power", gpu, power_w))

            outcomes = run_job(job, timeout_s=options.timeout_s, on_begin=begin, on_power=power, stop=stop)
            for outcome in outcomes:
                events.put(("outcome", gpu, unit, outcome))
    except BaseException as e:  # a bug in the sweep itself: stop the sweep, with the error
        error = e
    finally:
        events.put(("exit", gpu, error))


def _store(
    store: SweepStore, run_id: str, gpu: Any, unit: Unit, outcome: ConfigResult | Failure, options: SweepOptions
) -> ConfigResult | Failure:
    c = outcome.config
    if isinstance(outcome, Failure):
        store.add_failure(
            FailureRow(
                run_id,
                unit.key,
                unit.architecture,
                c.img_size,
                c,
                gpu.uuid,
                outcome.kind,
                outcome.message,
                outcome.wall_s,
                _utc_now(),
            )
        )
        return outcome
    where = dict(run_id=run_id, unit_key=unit.key, architecture=unit.architecture, img_size=c.img_size, config=c,
                 gpu_uuid=gpu.uuid, gpu_name=gpu.name, measured_utc=_utc_now())
    # Every measured figure is a field of the same name on both sides: copy them all, so a field added to the
    # measurement and the store is never forgotten here.
    measured = {f.name: getattr(outcome, f.name) for f in dataclasses.fields(ResultRow)
                if f.name not in where and hasattr(outcome, f.name)}
    store.add_result(ResultRow(**where, **measured))
    return outcome


class _Progress:
    """ "[k/n] model config  ETA mm:ss  live 312 W" on stderr: redrawn in place on a terminal; in a log (not a TTY),
    one plain line when an item starts and one when it ends. k counts the item being measured."""

    _REDRAW_S = 0.25

    def __init__(self, total: int, n_gpus: int, stream: IO[str], enabled: bool) -> None:
        self.total = total
        self.n_gpus = n_gpus
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.finished_walls: list[float] = []
        self.label = ""
        self.power_w: dict[int, float] = {}
        self._drawn_at = 0.0
        self._width = 0

    def _eta(self) -> str:
        if not self.finished_walls:
            return "--:--"
        left_s = statistics.median(self.finished_walls) * (self.total - len(self.finished_walls)) / self.n_gpus
        minutes, seconds = divmod(int(left_s), 60)
        return f"{minutes:02d}:{seconds:02d}"

    def _status(self) -> str:
        k = min(len(self.finished_walls) + 1, self.total)
        live = f"  live {sum(self.power_w.values()):.0f} W" if self.power_w else ""
        return f"[{k}/{self.total}] {self.label}  ETA {self._eta()}{live}"

    def _write_status(self) -> None:
        line = self._status()
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)
        self._drawn_at = time.monotonic()

    def _write_line(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width) + "\n")
            self._width = 0
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def begin(self, gpu: int, unit: Unit, config: Config) -> None:
        if not self.enabled:
            return
        self.label = f"{unit.key} {config.key}"
        self.power_w.pop(gpu, None)
        if self.tty:
            self._write_status()
        else:
            self._write_line(self._status())

    def power(self, gpu: int, power_w: float) -> None:
        self.power_w[gpu] = power_w
        if self.tty and time.monotonic() - self._drawn_at >= self._REDRAW_S:
            self._write_status()

    def draw(self) -> None:
        if self.tty and self.label:
            self._write_status()

    def finished(self, unit: Unit, outcome: ConfigResult | Failure) -> None:
        self.finished_walls.append(outcome.wall_s)
        if not self.enabled:
            return
        head = f"[{len(self.finished_walls)}/{self.total}] {unit.key} {outcome.config.key}:"
        if isinstance(outcome, Failure):
            first_line = outcome.message.splitlines()[0] if outcome.message else ""
            self._write_line(f"{head} FAILED ({outcome.kind}) {first_line[:160]}")
        else:
            r = outcome
            rel_ci = r.energy_per_image_ci95_j / r.energy_per_image_j if r.energy_per_image_j else math.nan
            self._write_line(
                f"{head} {r.energy_per_image_j:.4g} J/image ±{rel_ci:.1%}, "
                f"{r.images_per_s:.0f} images/s, {r.mean_power_w:.0f} W, {r.n_trials} trials, {r.wall_s:.1f} s"
                + ("" if r.warmup_converged else " (throughput still changing when warm-up ended)")
            )
        if self.tty:
            self._write_status()

    def close(self, interrupted: bool) -> None:
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
        if interrupted:
            self.stream.write("sweep interrupted: workers stopped; measured rows are kept, rerun to resume\n")
        self.stream.flush()
