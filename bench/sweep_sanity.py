"""Sanity checks of a `wattscope sweep` results file, printed as Markdown.

    python3 bench/sweep_sanity.py DB [--out-md PATH] [--gpu UUID]

(a) Throughput against timm's published RTX 5090 figures (AMP, NCHW, PyTorch 2.9.1, eager, at timm's own batch
    size): the ratio of our bf16, batch-64, NCHW, eager images/s to timm's, per model, sorted, with its median.
    Ratios beyond 2x of the median either way are outliers; each gets the explanation its columns support, or
    "unexplained".
(b) Speed: median wall time per model configuration (goal <= 20 s), and the shares of wall time spent in measured
    trials and in warm-up.
(c) Effects: bf16 against fp32 (energy per image, per model) and channels_last against NCHW where both exist.
(d) Rows whose 95 % CI of energy per image is above 2 % of it (the trials stopped at the cap first).

Uses only wattscope's public sweep API (SweepStore, Catalog) and pandas.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wattscope.sweep.catalog import Catalog, UnknownModelError
from wattscope.sweep.store import SweepStore

TARGET_CI_REL = 0.02  # the sweep's default --target-ci
OUTLIER_FACTOR = 2.0  # a ratio beyond factor x (or 1 / factor x) the median is an outlier
GOAL_MEDIAN_WALL_S = 20.0
# Below this share of the median row's power above idle, a row counts as drawing little power: the GPU waits on
# the host for much of each batch.
LOW_POWER_SHARE = 0.6
# The configuration compared with timm's table: theirs is AMP, NCHW, eager.
COMPARED = {"precision": "bf16", "batch_size": 64, "channels_last": False, "compile": False, "cuda_graphs": False}


@dataclass(frozen=True)
class Sanity:
    """Every figure the report prints. Ratios are ours / theirs; shares are of wall time."""

    gpu_name: str
    n_rows: int
    failures: pd.DataFrame  # kind, unit_key, config_key, message
    throughput: pd.DataFrame  # one row per unit of the compared configuration, by ratio
    median_ratio: float
    n_without_reference: int  # compared rows with no RTX 5090 figure at their size
    spearman_ratio_gmacs: float
    spearman_ratio_power: float
    speed: pd.DataFrame  # per slice (precision, channels_last) and "all"
    median_wall_s: float
    build_warmup: pd.DataFrame  # warm-up of a worker's first configuration (with the model build) vs the others
    run_spans: pd.DataFrame  # per sweep run: rows, sum of their wall_s, start to last row
    precision: pd.DataFrame  # bf16 / fp32 per unit
    channels_last: pd.DataFrame  # channels_last / NCHW per unit, bf16
    wide_ci: pd.DataFrame  # rows above TARGET_CI_REL


def load(
    db_path: str | Path, catalog: Catalog, gpu_uuid: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results joined with the catalog's timm figures, runs, failures) of one GPU of a sweep file."""
    with SweepStore(db_path, read_only=True) as store:
        df = store.to_dataframe("results")
        runs = store.to_dataframe("runs")
        failures = store.to_dataframe("failures")
    gpus = sorted(df["gpu_uuid"].unique())
    if gpu_uuid is None and len(gpus) > 1:
        raise ValueError(f"{db_path} holds results of {len(gpus)} GPUs ({', '.join(gpus)}); choose one with --gpu")
    if gpu_uuid is not None:
        if gpu_uuid not in gpus:
            raise ValueError(f"{db_path} has no result of GPU {gpu_uuid}; its GPUs: {', '.join(gpus)}")
        df = df[df["gpu_uuid"] == gpu_uuid]
    if df.empty:
        raise ValueError(f"{db_path} holds no result")
    failures = failures[failures["gpu_uuid"].isin(df["gpu_uuid"])]
    return join_catalog(df, catalog), runs[runs["run_id"].isin(df["run_id"])], failures


def join_catalog(df: pd.DataFrame, catalog: Catalog) -> pd.DataFrame:
    """Add each unit's family, GMACs and RTX 5090 figures (NaN for a unit the catalog lacks, or a row measured at
    another input size than the unit's, which timm's figure is not for)."""
    cols: dict[str, list] = {k: [] for k in ("family", "gmacs", "rtx5090_images_per_s", "rtx5090_batch_size")}
    for key, size in zip(df["unit_key"], df["config_img_size"], strict=True):
        try:
            u = catalog.get(key)
        except UnknownModelError:
            u = None
        same = u is not None and u.img_size == size
        cols["family"].append(u.family if u else None)
        cols["gmacs"].append(u.gmacs if u else math.nan)
        cols["rtx5090_images_per_s"].append(u.rtx5090_images_per_s if same else math.nan)
        cols["rtx5090_batch_size"].append(u.rtx5090_batch_size if same else math.nan)
    out = df.copy()
    for k, v in cols.items():
        out[k] = pd.Series(v, index=df.index, dtype="float64" if k != "family" else "object")
    out["ci_rel"] = out["energy_per_image_ci95_j"] / out["energy_per_image_j"]
    out["above_idle_w"] = out["mean_power_w"] - out["idle_power_w"]
    return out


def _select(df: pd.DataFrame, **config: object) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for k, v in config.items():
        mask &= df[k] == v
    return df[mask]


def explain(row: pd.Series, *, median_ratio: float, median_above_idle_w: float, batch_size: int) -> str:
    """Why a throughput outlier may be one, from its own columns only; "unexplained" when none supports a cause.

    A low ratio is put down to the host (Python and kernel launches) bounding the GPU at our batch size when timm
    measured at a larger batch and at least one column shows it: power above idle far below the median row's, the
    energy CI not reaching the target (trial-to-trial jitter), or bf16 not being faster than fp32 (time not spent
    in arithmetic).
    """
    if not row["ratio"] < median_ratio / OUTLIER_FACTOR:
        return "unexplained"
    evidence = []
    share = row["above_idle_w"] / median_above_idle_w
    if share < LOW_POWER_SHARE:
        evidence.append(f"power above idle {row['above_idle_w']:.0f} W = {share:.0%} of the median row's")
    if row["ci_rel"] > TARGET_CI_REL:
        evidence.append(f"CI {row['ci_rel']:.1%} after {row['n_trials']} trials")
    fp32 = row.get("fp32_images_per_s", math.nan)
    if not math.isnan(fp32) and row["images_per_s"] <= fp32:
        evidence.append(f"bf16 not faster than fp32 ({row['images_per_s']:.0f} vs {fp32:.0f} images/s)")
    bigger_batch = not math.isnan(row["rtx5090_batch_size"]) and row["rtx5090_batch_size"] > batch_size
    if not evidence or not bigger_batch:
        return "unexplained"
    cause = f"likely host/launch-bound at bs{batch_size} (timm: bs{row['rtx5090_batch_size']:.0f})"
    return f"{cause}: {'; '.join(evidence)}"


def analyse(df: pd.DataFrame, runs: pd.DataFrame, failures: pd.DataFrame) -> Sanity:
    """Every figure of the report from ``load``'s tables."""
    compared = _select(df, **COMPARED).copy()
    fp32 = _select(df, **{**COMPARED, "precision": "fp32"}).set_index("unit_key")["images_per_s"]
    compared["fp32_images_per_s"] = compared["unit_key"].map(fp32).astype("float64")
    compared["ratio"] = compared["images_per_s"] / compared["rtx5090_images_per_s"]
    with_ref = compared.dropna(subset=["ratio"]).sort_values("ratio")
    median_ratio = float(with_ref["ratio"].median()) if not with_ref.empty else math.nan
    median_above_idle_w = float(with_ref["above_idle_w"].median()) if not with_ref.empty else math.nan
    with_ref["outlier"] = (with_ref["ratio"] > median_ratio * OUTLIER_FACTOR) | (
        with_ref["ratio"] < median_ratio / OUTLIER_FACTOR
    )
    with_ref["power_share"] = with_ref["above_idle_w"] / median_above_idle_w
    with_ref["explanation"] = [
        explain(
            r, median_ratio=median_ratio, median_above_idle_w=median_above_idle_w, batch_size=COMPARED["batch_size"]
        )
        if r["outlier"]
        else ""
        for _, r in with_ref.iterrows()
    ]
    spearman = with_ref[["ratio", "gmacs", "mean_power_w"]].corr(method="spearman")

    # A worker builds its model before its first configuration and the runner adds that time to the first row's
    # warm-up; the first row of a (run, unit) by measured_utc is that worker's first.
    ordered = df.sort_values(["measured_utc", "unit_key", "config_key"])
    first = ~ordered.duplicated(subset=["run_id", "unit_key"], keep="first")
    df = df.assign(with_build=first.reindex(df.index))

    slices = [(_slice_name(p, cl), g) for (p, cl), g in df.groupby(["precision", "channels_last"])]
    speed = pd.DataFrame([_speed_row(name, g) for name, g in [*slices, ("all", df)]])
    build = pd.DataFrame(
        [_warmup_row("first of its worker (model build)", df[df["with_build"]])]
        + [_warmup_row("other", df[~df["with_build"]])]
    )
    spans = []
    for _, run in runs.iterrows():
        rows = df[df["run_id"] == run["run_id"]]
        if rows.empty:
            continue
        last = pd.Timestamp(rows["measured_utc"].max())
        spans.append(
            {
                "run started (UTC)": run["started_utc"],
                "configurations": "; ".join(
                    sorted({_slice_name(p, cl) for p, cl in zip(rows["precision"], rows["channels_last"], strict=True)})
                ),
                "rows": len(rows),
                "idle_power_w": rows["idle_power_w"].iloc[0],
                "sum wall_s": rows["wall_s"].sum(),
                "start to last row (s)": (last - pd.Timestamp(run["started_utc"])).total_seconds(),
            }
        )
    if spans:
        spans.append(
            {
                "run started (UTC)": "all runs",
                "configurations": "",
                "rows": sum(r["rows"] for r in spans),
                "idle_power_w": math.nan,
                "sum wall_s": sum(r["sum wall_s"] for r in spans),
                "start to last row (s)": sum(r["start to last row (s)"] for r in spans),
            }
        )
    return Sanity(
        gpu_name=", ".join(sorted(df["gpu_name"].unique())),
        n_rows=len(df),
        failures=failures,
        throughput=with_ref,
        median_ratio=median_ratio,
        n_without_reference=len(compared) - len(with_ref),
        spearman_ratio_gmacs=float(spearman.loc["ratio", "gmacs"]),
        spearman_ratio_power=float(spearman.loc["ratio", "mean_power_w"]),
        speed=speed,
        median_wall_s=float(df["wall_s"].median()),
        build_warmup=build,
        run_spans=pd.DataFrame(spans),
        precision=_paired(df, {**COMPARED, "precision": "fp32"}, COMPARED),
        channels_last=_paired(df, COMPARED, {**COMPARED, "channels_last": True}),
        wide_ci=df[df["ci_rel"] > TARGET_CI_REL].sort_values("ci_rel", ascending=False),
    )


def _slice_name(precision: str, channels_last: bool) -> str:
    return f"{precision}, {'channels_last' if channels_last else 'NCHW'}"


def _speed_row(name: str, g: pd.DataFrame) -> dict[str, object]:
    wall_s = g["wall_s"].sum()
    return {
        "slice": name,
        "rows": len(g),
        "median wall_s": g["wall_s"].median(),
        "max wall_s": g["wall_s"].max(),
        "measuring": g["measure_s"].sum() / wall_s,
        "warm-up": g["warmup_s"].sum() / wall_s,
        "median trials": g["n_trials"].median(),
        "rows at 6+ trials": int((g["n_trials"] >= 6).sum()),
    }


def _warmup_row(name: str, g: pd.DataFrame) -> dict[str, object]:
    return {
        "row": name,
        "rows": len(g),
        "median warmup_s": g["warmup_s"].median() if len(g) else math.nan,
        "median wall_s": g["wall_s"].median() if len(g) else math.nan,
        "warm-up share": g["warmup_s"].sum() / g["wall_s"].sum() if len(g) else math.nan,
    }


def _paired(df: pd.DataFrame, base: dict[str, object], other: dict[str, object]) -> pd.DataFrame:
    """Per unit measured in both configurations: other / base energy per image and images/s, and whether the
    energies differ by more than their combined 95 % CI half-widths (root sum of squares)."""
    cols = ["unit_key", "energy_per_image_j", "energy_per_image_ci95_j", "images_per_s"]
    b = _select(df, **base)[cols].set_index("unit_key")
    o = _select(df, **other)[cols].set_index("unit_key")
    both = b.merge(o, how="inner", left_index=True, right_index=True, suffixes=("_base", "_other"))
    out = pd.DataFrame(
        {
            "energy_ratio": both["energy_per_image_j_other"] / both["energy_per_image_j_base"],
            "images_per_s_ratio": both["images_per_s_other"] / both["images_per_s_base"],
            "beyond_ci": (both["energy_per_image_j_other"] - both["energy_per_image_j_base"]).abs()
            > (both["energy_per_image_ci95_j_other"] ** 2 + both["energy_per_image_ci95_j_base"] ** 2) ** 0.5,
        }
    )
    return out.sort_values("energy_ratio").reset_index()


# -- Markdown ---------------------------------------------------------------------------------------------------------


def _md_table(df: pd.DataFrame, formats: dict[str, str]) -> str:
    """A Markdown table of ``formats``' columns (a format spec each; "" for str())."""

    def cell(v: object, spec: str) -> str:
        if isinstance(v, float) and math.isnan(v):
            return ""
        return format(v, spec) if spec else str(v)

    head = "| " + " | ".join(formats) + " |"
    rule = "|" + "|".join("---" for _ in formats) + "|"
    body = ["| " + " | ".join(cell(r[c], s) for c, s in formats.items()) + " |" for _, r in df.iterrows()]
    return "\n".join([head, rule, *body])


def render(s: Sanity, source: str) -> str:
    t = s.throughput
    outliers = t[t["outlier"]]
    lo, hi = s.median_ratio / OUTLIER_FACTOR, s.median_ratio * OUTLIER_FACTOR
    wide = s.wide_ci
    prec, cl = s.precision, s.channels_last
    lines = [
        f"# Sweep sanity: {source}",
        "",
        f"{s.n_rows} result rows on {s.gpu_name}; {len(s.failures)} failures."
        + "".join(f"\n- {r['unit_key']} {r['config_key']}: {r['kind']}" for _, r in s.failures.iterrows()),
        "",
        "## (a) Throughput against timm's RTX 5090 figures",
        "",
        "Ours: bf16 autocast, batch 64, NCHW, eager. timm's: AMP, NCHW, PyTorch 2.9.1, eager, at the batch size in "
        "`rtx5090_batch_size`. `ratio` = ours / timm's; `power_share` = the row's mean power above idle / the "
        "median row's; `ci_rel` = the 95 % CI half-width of energy per image / energy per image.",
        "",
        _md_table(
            t,
            {
                "unit_key": "",
                "family": "",
                "gmacs": ".2f",
                "images_per_s": ".0f",
                "rtx5090_images_per_s": ".0f",
                "rtx5090_batch_size": ".0f",
                "ratio": ".3f",
                "mean_power_w": ".0f",
                "power_share": ".0%",
                "ci_rel": ".1%",
                "n_trials": "d",
            },
        ),
        "",
        f"Median ratio {s.median_ratio:.3f} over {len(t)} models"
        + (f" ({s.n_without_reference} without a timm figure left out)" if s.n_without_reference else "")
        + f"; outliers are ratios outside [{lo:.3f}, {hi:.3f}]. Spearman rank correlation of the ratio with GMACs "
        f"{s.spearman_ratio_gmacs:+.2f}, with mean power {s.spearman_ratio_power:+.2f}.",
        "",
        f"Outliers: {len(outliers)}",
        "",
    ]
    lines += [f"- {r['unit_key']} (ratio {r['ratio']:.3f}): {r['explanation']}" for _, r in outliers.iterrows()]
    sp = s.speed
    overall = sp[sp["slice"] == "all"].iloc[0]
    met = "met" if s.median_wall_s <= GOAL_MEDIAN_WALL_S else "NOT met"
    lines += [
        "",
        "## (b) Speed",
        "",
        _md_table(
            sp,
            {
                "slice": "",
                "rows": "d",
                "median wall_s": ".1f",
                "max wall_s": ".1f",
                "measuring": ".0%",
                "warm-up": ".0%",
                "median trials": ".0f",
                "rows at 6+ trials": "d",
            },
        ),
        "",
        f"Median wall time per model configuration {s.median_wall_s:.1f} s (goal <= {GOAL_MEDIAN_WALL_S:.0f} s: "
        f"{met}); {overall['measuring']:.0%} of the summed wall time in measured trials, {overall['warm-up']:.0%} "
        "in warm-up (shares are of the sums over rows).",
        "",
        "A worker's first configuration carries the model build in its warm-up:",
        "",
        _md_table(
            s.build_warmup,
            {"row": "", "rows": "d", "median warmup_s": ".1f", "median wall_s": ".1f", "warm-up share": ".0%"},
        ),
        "",
        "Per sweep run: the time from its start (stamped after the idle baseline) to its last row's stamp, both to "
        "the second, also holds what no row's wall_s counts (workers' exits, the runner between rows):",
        "",
        _md_table(
            s.run_spans,
            {
                "run started (UTC)": "",
                "configurations": "",
                "rows": "d",
                "idle_power_w": ".1f",
                "sum wall_s": ".0f",
                "start to last row (s)": ".0f",
            },
        ),
        "",
        "## (c) Effects of precision and memory format",
        "",
    ]
    if prec.empty:
        lines.append("No model has both a bf16 and an fp32 row (batch 64, NCHW, eager).")
    else:
        lines += [
            f"bf16 / fp32 energy per image over {len(prec)} models: median {prec['energy_ratio'].median():.3f} "
            f"(min {prec['energy_ratio'].min():.3f}, max {prec['energy_ratio'].max():.3f}); images/s ratio median "
            f"{prec['images_per_s_ratio'].median():.2f}; {int(prec['beyond_ci'].sum())} of {len(prec)} differ "
            "beyond their combined CI.",
            "",
            _md_table(prec, {"unit_key": "", "energy_ratio": ".3f", "images_per_s_ratio": ".2f", "beyond_ci": ""}),
        ]
    lines.append("")
    if cl.empty:
        lines.append("No model has both a channels_last and an NCHW row (bf16, batch 64, eager).")
    else:
        lines += [
            f"channels_last / NCHW (bf16) energy per image over {len(cl)} models: median "
            f"{cl['energy_ratio'].median():.3f} (min {cl['energy_ratio'].min():.3f}, max "
            f"{cl['energy_ratio'].max():.3f}); images/s ratio median {cl['images_per_s_ratio'].median():.2f}; "
            f"{int(cl['beyond_ci'].sum())} of {len(cl)} differ beyond their combined CI.",
            "",
            _md_table(cl, {"unit_key": "", "energy_ratio": ".3f", "images_per_s_ratio": ".2f", "beyond_ci": ""}),
        ]
    lines += [
        "",
        f"## (d) Rows above the {TARGET_CI_REL:.0%} CI target",
        "",
        f"{len(wide)} of {s.n_rows} rows.",
    ]
    if not wide.empty:
        lines += [
            "",
            _md_table(
                wide,
                {
                    "unit_key": "",
                    "config_key": "",
                    "ci_rel": ".1%",
                    "n_trials": "d",
                    "mean_power_w": ".0f",
                    "images_per_s": ".0f",
                },
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("db", help="a wattscope sweep file (SQLite)")
    ap.add_argument("--out-md", metavar="PATH", help="also write the report there")
    ap.add_argument("--gpu", metavar="UUID", help="the GPU to report, when the file holds several")
    args = ap.parse_args(argv)
    try:
        tables = load(args.db, Catalog.load(), args.gpu)
    except ValueError as e:
        print(f"sweep_sanity: {e}", file=sys.stderr)
        return 2
    text = render(analyse(*tables), args.db)
    print(text, end="")
    if args.out_md:
        Path(args.out_md).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
