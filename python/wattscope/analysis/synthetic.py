"""A sweep database with known answers, written through the real store: for tests and for developing the app.

The planted truth (``PLANTED``): in the reference slice (bf16, batch 64, NCHW, eager) the most efficient models lie
on a double-exponential frontier ``ln E = ln e0 + exp(alpha + beta (top1 - 80))``; the others sit above it by a
factor between ``INEFFICIENCY_RANGE``; every other configuration's energy is its source configuration's times a
fixed factor per method (``Planted.saving``), the same for every model except channels_last, which helps only the
convolutional families. Each stored energy carries a multiplicative measurement error of ``noise_log`` (the stored
``energy_per_image_ci95_j`` is its 95 % half-width). Accuracies and GMACs come from the catalog: the models are real
timm units, chosen across the top-1 range ``TOP1_RANGE_PCT``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..sweep import catalog as _catalog
from ..sweep import store as _store

TOP1_RANGE_PCT = (60.0, 88.0)
INEFFICIENCY_RANGE = (1.15, 5.0)  # energy / frontier energy of the models off the frontier
GPU_NAME = "Synthetic H100 (planted answers)"
GPU_UUID = "GPU-00000000-5e17-0000-0000-000000000000"
# Families whose networks are attention blocks: channels_last saves nothing there in the planted data.
_ATTENTION_FAMILIES = frozenset(
    {"vit", "deit", "deit3", "flexivit", "swin", "swinv2", "cait", "xcit", "beit", "eva", "volo", "crossvit", "twins"}
)


@dataclass(frozen=True)
class Planted:
    """The known answers of ``synthetic_database``. Savings are ``1 - E_method / E_source`` (a fraction)."""

    e0_j: float = 0.01
    alpha: float = 0.9
    beta_per_pt: float = 0.11
    noise_log: float = 0.004  # sd of ln(stored energy / true energy)
    reference: str = "bs64-bf16-cl0-comp0-graph0"  # the slice whose frontier is planted (config key less the size)
    savings: dict[str, float] = field(
        default_factory=lambda: {
            "bf16": 0.60,  # fp32 -> bf16 (batch 64, NCHW, eager)
            "fp16": 0.62,  # fp32 -> fp16
            "channels_last": 0.15,  # NCHW -> channels_last at bf16, convolutional families only
            "compile": 0.20,  # eager -> torch.compile at bf16
            "cuda_graphs": 0.08,  # no graphs -> CUDA graphs at bf16
            "batch_256": 0.12,  # batch 64 -> 256 at bf16
            "batch_1": -3.0,  # batch 64 -> 1 at bf16: four times the energy
        }
    )

    def frontier_energy_j(self, top1_pct: np.ndarray | float) -> np.ndarray:
        """The planted frontier of the reference slice: J per image at a top-1 accuracy (%)."""
        return self.e0_j * np.exp(np.exp(self.alpha + self.beta_per_pt * (np.asarray(top1_pct, float) - 80.0)))

    def saving(self, method: str, family: str) -> float:
        if method == "channels_last" and family in _ATTENTION_FAMILIES:
            return 0.0
        return self.savings[method]


PLANTED = Planted()

# (method, stored config relative to the bf16 reference, every k-th model): the configurations besides the two that
# every model has (fp32 and bf16 at batch 64), so that each method has several models but the file stays small.
_EXTRA: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("channels_last", dict(channels_last=True), 2),
    ("fp16", dict(precision="fp16"), 3),
    ("compile", dict(compile=True), 4),
    ("cuda_graphs", dict(cuda_graphs=True), 5),
    ("batch_256", dict(batch_size=256), 3),
    ("batch_1", dict(batch_size=1), 6),
)


def synthetic_database(path: str | Path, *, n_models: int = 60, seed: int = 0, first_kernels: dict | None = None
                       ) -> Path:
    """Write a sweep database with the known answers of ``PLANTED`` (see the module docstring) to ``path``, which
    must not exist yet. ``n_models`` timm units (at least 8) spread over ``TOP1_RANGE_PCT``; ``seed`` fixes which
    units, how far above the frontier the others lie, and the noise. ``first_kernels`` (the ``kernels_json``
    document: ``kernels`` rows and a ``power`` timeline) is stored on the first result, as a sweep with kernel tracing
    would. Returns the path."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists: synthetic_database writes a new file")
    if n_models < 8:
        raise ValueError(f"n_models must be at least 8 (a frontier and models above it), not {n_models}")
    rng = np.random.default_rng(seed)
    units = _pick_units(n_models, rng)
    truth = PLANTED
    # Every other model by accuracy is on the frontier, so that frontier models are evenly spaced and few models
    # off it fall into a gap of the frontier (where they would join the Pareto frontier); the most and least
    # accurate models anchor it at both ends.
    on_frontier = np.arange(n_models) % 2 == 0
    on_frontier[-1] = True
    low, high = np.log(INEFFICIENCY_RANGE)
    inefficiency = np.where(on_frontier, 1.0, np.exp(rng.uniform(low, high, n_models)))

    run_id = f"{seed:08x}" + "5e" * 12
    with _store.SweepStore(path) as store:
        store.start_run(
            _store.RunInfo(
                run_id=run_id,
                started_utc="2026-01-01T00:00:00+00:00",
                host="synthetic",
                gpu_name=GPU_NAME,
                gpu_uuid=GPU_UUID,
                driver_version="synthetic",
                cuda_version=None,
                torch_version=None,
                timm_version=None,
                wattscope_version=_store._wattscope_version(),
                command=f"wattscope.analysis.synthetic_database(n_models={n_models}, seed={seed})",
                options_json=json.dumps({"synthetic": True, "n_models": n_models, "seed": seed}),
            )
        )
        store.add_idle(run_id, GPU_UUID, 70.0, 0.5, "2026-01-01T00:00:00+00:00")
        for i, unit in enumerate(units):
            reference_j = float(truth.frontier_energy_j(unit.weights[0].top1)) * inefficiency[i]
            configs: list[tuple[dict[str, Any], float]] = [
                (dict(precision="fp32"), reference_j / (1.0 - truth.saving("bf16", unit.family))),
                ({}, reference_j),
            ]
            for method, change, every in _EXTRA:
                if i % every == (1 if method == "batch_256" else 0):
                    source_j = reference_j
                    if method == "fp16":  # fp16 replaces fp32 like bf16 does
                        source_j = reference_j / (1.0 - truth.saving("bf16", unit.family))
                    configs.append((change, source_j * (1.0 - truth.saving(method, unit.family))))
            for change, true_j in configs:
                store.add_result(_row(run_id, unit, change, true_j, truth.noise_log, rng))
        biggest = max(units, key=lambda u: u.gmacs or 0.0)
        store.add_failure(
            _store.FailureRow(
                run_id=run_id,
                unit_key=biggest.key,
                architecture=biggest.architecture,
                img_size=biggest.img_size,
                config=_config(biggest, dict(batch_size=1024)),
                gpu_uuid=GPU_UUID,
                kind="oom",
                message="CUDA out of memory (synthetic)",
                wall_s=3.0,
                failed_utc="2026-01-01T00:00:00+00:00",
            )
        )
    if first_kernels is not None:
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE results SET kernels_json = ? WHERE id = 1", (json.dumps(first_kernels),))
        conn.close()
    return path


def _pick_units(n: int, rng: np.random.Generator) -> list[_catalog.Unit]:
    """n measurable units with GMACs spread over the top-1 range: for each of n evenly spaced (jittered) target
    accuracies, the unused unit closest to it."""
    low, high = TOP1_RANGE_PCT
    candidates = sorted(
        (
            u
            for u in _catalog.Catalog.load().measurable
            if u.gmacs is not None
            and u.param_count_m is not None
            and low <= (u.best_top1 or 0.0) <= high
            and u.family != "test"
        ),
        key=lambda u: (u.best_top1, u.key),
    )
    if len(candidates) < n:
        raise ValueError(f"n_models={n}: the catalog has only {len(candidates)} units in {low}-{high} % top-1")
    top1 = np.array([u.best_top1 for u in candidates])
    step = (high - low) / n
    targets = low + step * (np.arange(n) + rng.uniform(0.0, 1.0, n))
    free = np.ones(len(candidates), dtype=bool)
    picks = []
    for target in targets:
        j = int(np.argmin(np.where(free, np.abs(top1 - target), np.inf)))
        free[j] = False
        picks.append(candidates[j])
    return sorted(picks, key=lambda u: (u.best_top1, u.key))


def _config(unit: _catalog.Unit, change: dict[str, Any]) -> _store.Config:
    """The reference configuration (bf16, batch 64, NCHW, eager) at the unit's size, with ``change`` applied."""
    reference = _store.Config(
        batch_size=64, precision="bf16", channels_last=False, compile=False, cuda_graphs=False, img_size=unit.img_size
    )
    return dataclasses.replace(reference, **change)


def _row(
    run_id: str, unit: _catalog.Unit, change: dict[str, Any], true_j: float, noise_log: float, rng: np.random.Generator
) -> _store.ResultRow:
    config = _config(unit, change)
    energy_j = true_j * math.exp(rng.normal(0.0, noise_log))
    power_w = float(rng.uniform(300.0, 600.0))
    idle_w = 70.0
    images_per_s = power_w / energy_j
    window_s = 1.6
    return _store.ResultRow(
        run_id=run_id,
        unit_key=unit.key,
        architecture=unit.architecture,
        img_size=unit.img_size,
        config=config,
        gpu_uuid=GPU_UUID,
        gpu_name=GPU_NAME,
        energy_per_image_j=energy_j,
        energy_per_image_above_idle_j=energy_j - idle_w / images_per_s,
        energy_per_image_ci95_j=1.96 * noise_log * energy_j,
        images_per_s=images_per_s,
        latency_per_batch_ms=1000.0 * config.batch_size / images_per_s,
        mean_power_w=power_w,
        idle_power_w=idle_w,
        peak_power_w=1.15 * power_w,
        peak_memory_bytes=int(2e9),
        sm_clock_mhz=1980.0,
        temperature_c=55.0,
        sensor_source="synthetic",
        sensor_profile="synthetic",
        n_trials=3,
        window_s=window_s,
        warmup_s=2.0,
        measure_s=3 * window_s,
        wall_s=3 * window_s + 2.0,
        energy_uncertainty_j=0.005 * energy_j * images_per_s * window_s,
        coverage=1.0,
        measured_utc="2026-01-01T00:00:00+00:00",
    )
