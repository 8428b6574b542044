"""The energy saved by each method a PyTorch user can switch on, per model and per family.

A method's saving is measured on pairs of results of the same model on the same GPU that differ in that one setting
and nothing else: ``1 - E_with / E_without`` (a fraction; negative when the method costs energy). Results whose
energy is not a positive finite number are left out, with an ``AnalysisWarning`` naming them.

"The same GPU" is the GPU model (``gpu_name``), not the board: results from two boards of one GPU model pair with
each other, so that a model measured with the method on one board and without it on another still counts. Where
a model has a pair on one board (``same_board``), its pairs across boards for the same two configurations are
dropped: they would add the difference between boards (up to 21 % for one model on the shipped H100 data, far beyond
the measurements' own intervals) and nothing else. A pair across boards keeps the two measurements' intervals, which
do not include that difference; across models, the t interval includes it through the spread between models.

- ``bf16``, ``fp16``, ``tf32``: from fp32 to that precision;
- ``channels_last``, ``compile``, ``cuda_graphs``: from off to on;
- ``batch_<n>``: from the reference batch size (the one with the most results; ties go to the one nearest 64) to n.

The other settings of a pair are its context (``from_config``): on the shipped H100 data channels_last exists only at
bf16, so its saving is channels_last at bf16. Per pair, the 95 % interval comes from the two results' own intervals
(``energy_per_image_ci95_j``), combined in log space: the half-width of ln(E_with / E_without) is the root sum of
squares of the two relative half-widths. Across models (``method_savings_by_family``) the saving is the geometric
mean ratio, with a t interval over the models' log ratios (the spread between models, measurement noise included);
a group of one model keeps that model's own interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .results import usable_energy

_SETTINGS = ("precision", "channels_last", "compile", "cuda_graphs", "batch_size")
_KEY = ("gpu_name", "unit_key", "config_img_size")
_SWITCHES = ("channels_last", "compile", "cuda_graphs")


def reference_batch_size(df: pd.DataFrame) -> int:
    """The batch size most results were measured at (ties: the one nearest 64)."""
    counts = df["batch_size"].value_counts()
    top = counts[counts == counts.max()].index
    return int(min(top, key=lambda b: (abs(math.log(b / 64)), b)))


def method_order(method: str) -> tuple[int, int, str]:
    """A sort key for method names: the precisions (the largest savings), the switches, then batch sizes by size."""
    fixed = ("bf16", "fp16", "tf32", "channels_last", "compile", "cuda_graphs")
    if method in fixed:
        return (0, fixed.index(method), method)
    if method.startswith("batch_") and method[6:].isdigit():
        return (1, int(method[6:]), method)
    return (2, 0, method)


def energy_factor(saving_frac: float, ci95_low: float, ci95_high: float) -> tuple[float, float, float]:
    """A saving as the factor it multiplies energy by, with its interval (a larger saving is a smaller factor, so
    the bounds swap): how a setting that costs energy (batch 1: "costs 19.8x") reads better than "-1882 % saved"."""
    return 1 - saving_frac, 1 - ci95_high, 1 - ci95_low


def method_savings(df: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of results that differ in one method: ``unit_key``, ``family``, ``gpu_name``, ``method``,
    ``from_config``, ``to_config``, ``energy_from_j``, ``energy_to_j``, ``saving_frac``, ``ci95_low``,
    ``ci95_high`` (of the saving), ``beyond_ci`` (the interval excludes 0), ``n_models`` (1), ``same_board`` (both
    results from one ``gpu_uuid``; see the module docstring for pairs across boards), ``from_gpu_uuid`` and
    ``to_gpu_uuid`` (the boards of the two results)."""
    df = usable_energy(df, "method savings")
    rows = []
    ref_batch = reference_batch_size(df) if len(df) else 64
    for _, group in df.groupby(list(_KEY), sort=False):
        if len(group) < 2:
            continue
        records = group.to_dict("records")
        for a in records:
            for b in records:
                method = _method(a, b, ref_batch)
                if method is not None:
                    rows.append(_pair(a, b, method))
    columns = [
        "unit_key",
        "family",
        "gpu_name",
        "method",
        "from_config",
        "to_config",
        "energy_from_j",
        "energy_to_j",
        "saving_frac",
        "ci95_low",
        "ci95_high",
        "beyond_ci",
        "n_models",
        "same_board",
        "from_gpu_uuid",
        "to_gpu_uuid",
    ]
    out = pd.DataFrame(rows, columns=columns)
    if len(out):
        # A pair on one board isolates the method; pairs of the same configurations across boards add only the
        # boards' difference.
        pair = ["gpu_name", "unit_key", "method", "from_config", "to_config"]
        has_same = out.groupby(pair, sort=False)["same_board"].transform("any")
        out = out[out["same_board"] | ~has_same]
    return out.sort_values(["method", "unit_key", "from_config"], kind="mergesort").reset_index(drop=True)


def _method(a: dict, b: dict, ref_batch: int) -> str | None:
    """The method that turns result a into result b, or None when they differ in anything else or a is not its
    starting point."""
    differ = [s for s in _SETTINGS if a[s] != b[s]]
    if len(differ) != 1:
        return None
    setting = differ[0]
    if setting == "precision":
        return str(b["precision"]) if a["precision"] == "fp32" else None
    if setting in _SWITCHES:
        return setting if not a[setting] and b[setting] else None
    return f"batch_{int(b['batch_size'])}" if a["batch_size"] == ref_batch else None


def _pair(a: dict, b: dict, method: str) -> dict:
    ratio = b["energy_per_image_j"] / a["energy_per_image_j"]
    half = math.hypot(_rel(b), _rel(a))
    low_ratio, high_ratio = ratio * math.exp(-half), ratio * math.exp(half)
    return {
        "unit_key": a["unit_key"],
        "family": a["family"],
        "gpu_name": a["gpu_name"],
        "method": method,
        "from_config": a["config_key"],
        "to_config": b["config_key"],
        "energy_from_j": a["energy_per_image_j"],
        "energy_to_j": b["energy_per_image_j"],
        "saving_frac": 1.0 - ratio,
        "ci95_low": 1.0 - high_ratio,
        "ci95_high": 1.0 - low_ratio,
        "beyond_ci": bool(high_ratio < 1.0 or low_ratio > 1.0),
        "n_models": 1,
        "same_board": a["gpu_uuid"] == b["gpu_uuid"],
        "from_gpu_uuid": a["gpu_uuid"],
        "to_gpu_uuid": b["gpu_uuid"],
    }


def _rel(row: dict) -> float:
    ci = row["energy_per_image_ci95_j"]
    return 0.0 if ci is None or not math.isfinite(ci) else ci / row["energy_per_image_j"]


def method_savings_by_family(df: pd.DataFrame) -> pd.DataFrame:
    """Per GPU model (``gpu_name``), family and method, and over all families (``family`` = ``"all"``): a method
    saves different fractions on different GPUs, so they are never pooled. ``n_models``, ``saving_frac`` (from
    the geometric mean ratio), ``ci95_low``, ``ci95_high``, ``helps`` (the interval is above 0), ``hurts`` (below
    0), ``n_cross_board`` (models whose saving comes only from pairs across boards). A model with several contexts
    for a method (e.g. channels_last at fp32 and at bf16), or several pairs (boards), counts once, with the
    geometric mean of its ratios."""
    pairs = method_savings(df)
    columns = ["gpu_name", "family", "method", "n_models", "saving_frac", "ci95_low", "ci95_high", "helps", "hurts",
               "n_cross_board"]
    if pairs.empty:
        return pd.DataFrame(columns=columns)
    pairs = pairs.assign(
        _log_ratio=np.log1p(-pairs["saving_frac"]),
        _log_half=np.log((1.0 - pairs["ci95_low"]) / (1.0 - pairs["saving_frac"])),
    )
    per_model = pairs.groupby(["gpu_name", "method", "unit_key", "family"], as_index=False).agg(
        _log_ratio=("_log_ratio", "mean"), _log_half=("_log_half", "max"), _same_board=("same_board", "any")
    )
    rows = []
    for (gpu, method, family), g in per_model.groupby(["gpu_name", "method", "family"], sort=True):
        rows.append(_aggregate(g, gpu, family, method))
    for (gpu, method), g in per_model.groupby(["gpu_name", "method"], sort=True):
        rows.append(_aggregate(g, gpu, "all", method))
    out = pd.DataFrame(rows, columns=columns)
    # Per GPU and method (in method_order): the families by name, then "all".
    out["_order"] = out["method"].map(method_order)
    out["_overall"] = out["family"] == "all"
    out = out.sort_values(["gpu_name", "_order", "_overall", "family"], kind="mergesort")
    return out.drop(columns=["_order", "_overall"]).reset_index(drop=True)


def _aggregate(g: pd.DataFrame, gpu_name: str, family: str, method: str) -> dict:
    logs = g["_log_ratio"].to_numpy(float)
    n = len(logs)
    mean = float(logs.mean())
    if n == 1:
        half = float(g["_log_half"].iloc[0])
    else:
        half = float(stats.t.ppf(0.975, n - 1) * logs.std(ddof=1) / math.sqrt(n))
    saving = 1.0 - math.exp(mean)
    low, high = 1.0 - math.exp(mean + half), 1.0 - math.exp(mean - half)
    return {
        "gpu_name": gpu_name,
        "family": family,
        "method": method,
        "n_models": n,
        "saving_frac": saving,
        "ci95_low": low,
        "ci95_high": high,
        "helps": low > 0.0,
        "hurts": high < 0.0,
        "n_cross_board": int((~g["_same_board"].astype(bool)).sum()),
    }
