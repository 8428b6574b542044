"""The measurement protocol for one model in one configuration, run inside a sweep worker process.

For each configuration: put the model in the configuration's form (precision, memory format, ``torch.compile``,
CUDA graph), then

1. warm up until throughput is stable: blocks of batches, each timed with a device sync at its end, until the
   coefficient of variation of the last 5 blocks' time per batch is below ``warmup_cv``, or, for runs too noisy
   for that (small batches, bound by the host), until the last 5 blocks no longer drift from the 5 before them
   (``_steady``), or until ``warmup_cap_s`` has passed (the result says whether warm-up converged). The first call
   (compilation, graph capture, lazy CUDA initialisation) never counts as a block and is not part of the cap; its
   time is in the result's ``warmup_s``.
2. measure trials: sleep the trial's phase offset (so window edges fall at different phases of the sensor's sample
   clock), then a ``PowerMeter`` window around whole batches, launched until the protocol's window has passed
   (``wattscope.calibration.protocol.plan``: long enough for the sensor). PowerMeter synchronises the GPU at both
   edges, so no sync inside the window adds bubbles.
3. stop when the 95 % confidence interval of energy per image across trials (Student t) is narrower than
   ``target_ci`` of its mean, after at least ``min_trials`` and at most ``max_trials`` trials.

Energy above idle subtracts the sweep's idle baseline times each window's duration. Everything here also runs on
device "cpu" (tests): the model then runs on the CPU while the meter reads whatever GPU ``meter_device`` names (the
fake NVML in tests).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import PowerMeter
from .store import Config

if TYPE_CHECKING:
    import torch

# Two-sided 95 % Student t quantiles by degrees of freedom (no scipy): t_{0.975, df}.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
_WARMUP_BLOCKS = 5


def t975(df: int) -> float:
    """The 97.5th percentile of Student's t with ``df`` degrees of freedom (the 95 % two-sided factor)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    # Beyond the table, the Cornish-Fisher expansion around the normal quantile is good to 1e-4.
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ci95_half_width(values: list[float] | tuple[float, ...]) -> float:
    """Half-width of the 95 % confidence interval of the mean of ``values`` (inf for fewer than 2)."""
    if len(values) < 2:
        return math.inf
    return t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class MeasureSettings:
    """How the worker measures: the same for every model of a sweep on one GPU."""

    device: str  # "cuda": the worker's GPU (the only one it sees); "cpu": the model runs on the CPU (tests)
    meter_device: str  # UUID of the GPU whose power the meter reads
    idle_power_w: float  # the sweep's idle baseline of that GPU
    window_s: float  # shortest trial window (calibration.protocol.plan)
    offsets_s: tuple[float, ...]  # phase offset slept before each trial (reused cyclically)
    target_ci: float = 0.02  # stop when the 95 % CI half-width of energy per image is below this share of the mean
    min_trials: int = 3
    max_trials: int = 6
    warmup_block_s: float = 0.2
    warmup_cap_s: float = 10.0
    warmup_cv: float = 0.02

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', not {self.device!r}")
        if not 2 <= self.min_trials <= self.max_trials:
            raise ValueError(f"need 2 <= min_trials ({self.min_trials}) <= max_trials ({self.max_trials})")
        if not self.offsets_s:
            raise ValueError("offsets_s must hold at least one phase offset")


@dataclass(frozen=True)
class ConfigResult:
    """What one (model, configuration) measured; the runner adds the run, unit and GPU to make a ResultRow.

    Per-image figures are over all trials. ``energy_uncertainty_j`` is the meter's bound on one trial's energy
    (mean over trials); ``window_s`` the mean trial duration; ``warmup_s`` the time before the first trial
    (configuring, compiling, capturing, warming up; the runner adds the model's load time to a worker's first
    configuration), ``measure_s`` the trials with their offsets and result waits, ``wall_s`` all of it.
    """

    config: Config
    energy_per_image_j: float
    energy_per_image_above_idle_j: float
    energy_per_image_ci95_j: float
    images_per_s: float
    latency_per_batch_ms: float
    mean_power_w: float
    idle_power_w: float
    peak_power_w: float
    peak_memory_bytes: int | None
    sm_clock_mhz: float | None
    temperature_c: float | None
    sensor_source: str
    sensor_profile: str
    n_trials: int
    window_s: float
    warmup_s: float
    measure_s: float
    wall_s: float
    energy_uncertainty_j: float
    coverage: float
    warmup_converged: bool  # False: the warm-up cap passed before throughput settled


@dataclass(frozen=True)
class WarmUp:
    seconds_per_batch: float
    blocks: int
    converged: bool
    elapsed_s: float


def prepare_model(model: torch.nn.Module, settings: MeasureSettings) -> torch.nn.Module:
    """Move a freshly built model to the measuring device in eval mode (once per worker, shared by its configs)."""
    return model.to(_torch_device(settings)).eval()


def measure_config(
    model: torch.nn.Module,
    config: Config,
    settings: MeasureSettings,
    *,
    on_trial: Callable[[int, float], None] | None = None,
) -> ConfigResult:
    """Measure ``model`` (from ``prepare_model``) in ``config``. ``on_trial(index, mean_power_w)`` after each trial.

    Raises what the model raises (``torch.OutOfMemoryError``, torch.compile's errors, ...): the worker classifies.
    """
    import torch

    t0 = time.monotonic()
    device = _torch_device(settings)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step = None
    try:
        with torch.inference_mode():
            step = _step_function(model, config, device)
            sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
            # Under a meter, so the sampler thread is running before the first trial rather than starting inside it.
            with PowerMeter(settings.meter_device, name="warm-up"):
                warm = warm_up(step, sync, settings)
            t_measure = time.monotonic()
            trials = _trials(step, config, settings, on_trial)
            t_end = time.monotonic()
        peak_memory = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    finally:
        del step
        release(config, settings)
    return _summarise(
        config,
        settings,
        trials,
        warm,
        peak_memory,
        warmup_s=t_measure - t0,
        measure_s=t_end - t_measure,
        wall_s=time.monotonic() - t0,
    )


def warm_up(step: Callable[[], Any], sync: Callable[[], None], settings: MeasureSettings) -> WarmUp:
    """Run ``step`` until its time per batch is stable (see the module docstring)."""
    t0 = time.monotonic()
    step()  # compilation, graph capture and lazy initialisation happen here: never a timing block
    sync()
    t1 = time.monotonic()  # the cap counts from here: a compilation longer than the cap must still leave blocks
    step()
    sync()
    seconds_per_batch = max(time.monotonic() - t1, 1e-6)
    per_block = max(1, round(settings.warmup_block_s / seconds_per_batch))
    blocks: list[float] = []
    converged = False
    while True:
        tb = time.monotonic()
        for _ in range(per_block):
            step()
        sync()
        blocks.append((time.monotonic() - tb) / per_block)
        if _steady(blocks, settings.warmup_cv):
            converged = True
            break
        if time.monotonic() - t1 >= settings.warmup_cap_s:
            break
    return WarmUp(statistics.median(blocks[-_WARMUP_BLOCKS:]), len(blocks), converged, time.monotonic() - t0)


def _steady(blocks: list[float], cv: float) -> bool:
    """Whether the time per batch has settled: the last 5 blocks agree within ``cv`` (coefficient of variation), or,
    when they are noisier than that (small batches, bound by the host's launches), the last 5 and the 5 before them
    no longer differ by more than ``cv`` of the mean or than their noise (twice the standard error of the
    difference)."""
    last = blocks[-_WARMUP_BLOCKS:]
    if len(last) < _WARMUP_BLOCKS:
        return False
    mean = statistics.mean(last)
    if statistics.stdev(last) < cv * mean:
        return True
    before = blocks[-2 * _WARMUP_BLOCKS : -_WARMUP_BLOCKS]
    if len(before) < _WARMUP_BLOCKS:
        return False
    noise = 2 * math.sqrt((statistics.variance(last) + statistics.variance(before)) / _WARMUP_BLOCKS)
    return abs(mean - statistics.mean(before)) < max(cv * mean, noise)


@dataclass(frozen=True)
class _Trial:
    energy_j: float
    duration_s: float
    images: int
    peak_power_w: float
    uncertainty_j: float
    coverage: float
    source: str
    sensor_model: str
    sm_clock_mhz: float | None
    temperature_c: float | None


def _trials(
    step: Callable[[], Any], config: Config, settings: MeasureSettings, on_trial: Callable[[int, float], None] | None
) -> list[_Trial]:

    trials: list[_Trial] = []
    per_image: list[float] = []
    for i in range(settings.max_trials):
        time.sleep(settings.offsets_s[i % len(settings.offsets_s)])
        batches = 0
        # strict: a lost GPU or readings that never arrived raise (a failure row) instead of a NaN result that
        # would be stored, and skipped by every resume.
        with PowerMeter(settings.meter_device, name=config.key, strict=True) as m:
            t_start = time.monotonic()
            # The host may run ahead of an asynchronous GPU, never behind it: once the host has spent window_s
            # queueing, the GPU work (which the meter's closing sync waits for) lasts at least as long.
            while True:
                step()
                batches += 1
                if time.monotonic() - t_start >= settings.window_s:
                    break
        r = m.result
        g = r.gpus[0]
        images = batches * config.batch_size
        trials.append(
            _Trial(
                r.energy_j,
                r.duration_s,
                images,
                r.peak_power_w,
                r.uncertainty_j,
                r.coverage,
                g.source,
                g.sensor_profile or g.sensor_model,
                g.sm_clock_mhz_mean,
                g.temperature_c_max,
            )
        )
        per_image.append(r.energy_j / images)
        if on_trial is not None:
            on_trial(i, r.mean_power_w)
        mean = statistics.mean(per_image)
        if len(per_image) >= settings.min_trials and ci95_half_width(per_image) < settings.target_ci * abs(mean):
            break
    return trials


def _summarise(
    config: Config,
    settings: MeasureSettings,
    trials: list[_Trial],
    warm: WarmUp,
    peak_memory_bytes: int | None,
    *,
    warmup_s: float,
    measure_s: float,
    wall_s: float,
) -> ConfigResult:
    per_image = [t.energy_j / t.images for t in trials]
    above_idle = [(t.energy_j - settings.idle_power_w * t.duration_s) / t.images for t in trials]
    energy_j = sum(t.energy_j for t in trials)
    duration_s = sum(t.duration_s for t in trials)
    images = sum(t.images for t in trials)
    batches = images // config.batch_size
    clocks = [t.sm_clock_mhz for t in trials if t.sm_clock_mhz is not None]
    temps = [t.temperature_c for t in trials if t.temperature_c is not None]
    peaks = [t.peak_power_w for t in trials if not math.isnan(t.peak_power_w)]
    last = trials[-1]
    return ConfigResult(
        config=config,
        energy_per_image_j=statistics.mean(per_image),
        energy_per_image_above_idle_j=statistics.mean(above_idle),
        energy_per_image_ci95_j=ci95_half_width(per_image),
        images_per_s=images / duration_s,
        latency_per_batch_ms=duration_s / batches * 1e3,
        mean_power_w=energy_j / duration_s,
        idle_power_w=settings.idle_power_w,
        peak_power_w=max(peaks, default=math.nan),
        peak_memory_bytes=peak_memory_bytes,
        sm_clock_mhz=statistics.mean(clocks) if clocks else None,
        temperature_c=max(temps, default=None),
        sensor_source=last.source,
        # The meter's description of the sensor model names the calibration profile file when one was used.
        sensor_profile=last.sensor_model,
        n_trials=len(trials),
        window_s=duration_s / len(trials),
        warmup_s=warmup_s,
        measure_s=measure_s,
        wall_s=wall_s,
        energy_uncertainty_j=statistics.mean(t.uncertainty_j for t in trials),
        coverage=min(t.coverage for t in trials),
        warmup_converged=warm.converged,
    )


def _torch_device(settings: MeasureSettings) -> torch.device:
    import torch

    # The worker sees only its own GPU (CUDA_VISIBLE_DEVICES), which CUDA then numbers 0.
    return torch.device("cuda", 0) if settings.device == "cuda" else torch.device("cpu")


def _set_fp32_precision(torch: Any, tf32: bool) -> None:
    mode = "tf32" if tf32 else "ieee"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; the allow_tf32 flags are deprecated there
        matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def _step_function(model: torch.nn.Module, config: Config, device: torch.device) -> Callable[[], Any]:
    """One batch of inference in ``config``'s form, as a no-argument callable."""
    import torch

    _set_fp32_precision(torch, config.precision == "tf32")
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)  # type: ignore[call-overload]  # torch's stub omits memory_format
    x = torch.randn(config.batch_size, 3, config.img_size, config.img_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    runner = torch.compile(model) if config.compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    def forward() -> Any:
        if dtype is None:
            return runner(x)
        with torch.autocast(device.type, dtype=dtype):
            return runner(x)

    if not config.cuda_graphs:
        return forward
    if device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    # Capture needs the lazy work (cuBLAS handles, autotuning, compilation) done first, on a side stream.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()

    def replay() -> Any:
        graph.replay()
        return static_out

    return replay


def release(config: Config, settings: MeasureSettings) -> None:
    """Free what a configuration left behind, so the next one starts clean (and after an OOM, can run at all).
    Call it again once a failure's traceback is dropped: its frames hold the configuration's tensors."""
    import torch

    if config.compile:
        torch._dynamo.reset()  # compiled graphs of this config's shapes would count against the recompile limit
    gc.collect()
    if settings.device == "cuda":
        torch.cuda.empty_cache()
