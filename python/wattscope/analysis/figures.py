"""The key findings as matplotlib PNGs: the frontier with its fits, energy against GMACs, and the methods' savings.

``write_figures`` draws from one configuration slice (``select_slice``) and, for energy against GMACs, also the
fp32 baseline slice of the same GPU (eager, NCHW; at the same batch size where there is one, else at its most
measured batch size), so that the gap between precisions shows.
As in the rest of the analysis, a GPU is its ``gpu_name``: a model measured on several boards of it is one point
(``combine_boards``), and the method figure marks the pairs whose two results come from different boards. Results
whose energy is not a positive finite number are not drawn (the analysis functions warn, naming them).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .fit import FORMS, FrontierFit, fit_frontier
from .methods import energy_factor, method_order, method_savings, method_savings_by_family
from .results import combine_boards, select_slice, slice_label, usable_energy
from .score import BAND_COLOURS, BAND_EDGES, BANDS, score_models

FIGURES = ("frontier.png", "energy_vs_gmacs.png", "method_savings.png")
_FORM_LABEL = {"double_exponential": "double exponential", "exponential": "exponential", "power_law": "power law"}
_DPI = 150


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ModuleNotFoundError("figures need matplotlib: pip install 'wattscope[plot]'", name="matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(df: pd.DataFrame, out_dir: str | Path, **where: object) -> list[Path]:
    """Write ``FIGURES`` into ``out_dir`` (created if missing) from the results ``df`` (``load_results``), for the
    slice ``select_slice(df, **where)``. Returns the paths written. The method figure is skipped (not written)
    when no two results differ in one method."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = select_slice(df, **where)
    label = slice_label(chosen.iloc[0])
    written = []
    fit = fit_frontier(chosen)
    written.append(_frontier(plt, chosen, fit, label, out / FIGURES[0]))
    written.append(_energy_vs_gmacs(plt, df, chosen, out / FIGURES[1]))
    savings = method_savings(df[df["gpu_name"] == chosen["gpu_name"].iloc[0]])
    if not savings.empty:
        written.append(_methods(plt, savings, df, out / FIGURES[2]))
    return written


def _frontier(plt: Any, rows: pd.DataFrame, fit: FrontierFit, label: str, path: Path) -> Path:
    rows = combine_boards(usable_energy(rows[rows["top1"].notna()], "frontier figure"))
    scores = score_models(rows, fit)
    fig, ax = plt.subplots(figsize=(12, 6.2))
    for band in sorted(set(scores["band"].dropna())):
        sel = scores["band"] == band
        ax.scatter(
            rows.loc[sel, "top1"],
            rows.loc[sel, "energy_per_image_j"],
            s=28,
            color=BAND_COLOURS[band],
            edgecolor="0.3",
            linewidth=0.5,
            zorder=3,
            label=f"score {band}",
        )
    front = fit.frontier.sort_values("top1")
    ax.plot(
        front["top1"],
        front["energy_per_image_j"],
        "o",
        ms=9,
        mfc="none",
        mec="k",
        mew=1.2,
        zorder=4,
        label="Pareto frontier",
    )
    table = fit.forms.set_index("form")
    others = iter(("--", ":"))
    for form in sorted(FORMS, key=lambda f: f != fit.best):
        curve = fit.curve(200, form)
        delta = table.loc[form, "delta_aicc"]
        r2 = table.loc[form, "r2"]
        best = form == fit.best
        ax.plot(
            curve["top1"],
            curve["energy_per_image_j"],
            "-" if best else next(others),
            color="k" if best else "0.4",
            lw=2.0 if best else 1.2,
            zorder=2,
            label=f"{_FORM_LABEL[form]} fit{' (lowest AICc)' if best else ''}: ΔAICc {_num(delta, '.1f')}, "
            f"R² {_num(r2, '.2f')}",
        )
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 1.4)  # room above the expensive end, where the frontier's labels crowd
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("ImageNet-1k top-1 accuracy (%, timm's best weight)")
    ax.set_ylabel("energy per image (J, log scale)")
    ax.set_title(f"Accuracy against energy: {label}, {len(rows)} models{_boards_note(rows)}", fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    # Outside the axes: any corner inside may hide a model (a frontier point can sit far below the fitted curve).
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    verdict = "\n".join(textwrap.wrap(fit.verdict, 170))
    fig.text(
        0.01,
        0.01,
        verdict + f"\nScore bands: energy / fitted frontier at equal accuracy, A ≤ {BAND_EDGES[0]:g} ... "
        f"{BANDS[-1]} > {BAND_EDGES[-1]:g}.",
        fontsize=7.5,
        va="bottom",
        color="0.2",
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    # Last: the labels are placed by where things are drawn, which the layout above decides.
    _label_points(
        fig,
        ax,
        front["top1"].to_numpy(float),
        front["energy_per_image_j"].to_numpy(float),
        list(front["architecture"]),
        rows[["top1", "energy_per_image_j"]].to_numpy(float),
        [fit.curve(60, form).to_numpy(float) for form in FORMS],
        radius_pt=(6.0, 4.0),  # the rings (ms 9, edge 1.2) and the dots (s 28), with a little room
    )
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _energy_vs_gmacs(plt: Any, df: pd.DataFrame, chosen: pd.DataFrame, path: Path) -> Path:
    first = chosen.iloc[0]
    panels = [(chosen, _short_config(first))]
    if not first["baseline"]:
        # The fp32 baseline (eager, NCHW) of the same GPU: at the same batch size where there is one, else at the
        # batch size with the most baseline results.
        baseline = df[(df["gpu_name"] == first["gpu_name"]) & df["baseline"]]
        if len(baseline):
            same = baseline[baseline["batch_size"] == first["batch_size"]]
            if same.empty:
                same = baseline[baseline["batch_size"] == baseline["batch_size"].value_counts().idxmax()]
            panels.append((same, _short_config(same.iloc[0])))
    families = sorted(set().union(*(set(p["family"].dropna()) for p, _ in panels)))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>ph*"
    style = {f: (cmap(i % 20), markers[(i // 20) % len(markers)]) for i, f in enumerate(families)}
    fig, ax = plt.subplots(figsize=(10, 6.2))
    fill = {0: True, 1: False}
    for k, (rows, config) in enumerate(panels):
        rows = combine_boards(usable_energy(rows, "energy against GMACs figure"))
        rows = rows[np.isfinite(rows["gmacs"]) & (rows["gmacs"] > 0)]
        for family, g in rows.groupby("family"):
            colour, marker = style[family]
            ax.scatter(
                g["gmacs"],
                g["energy_per_image_j"],
                marker=marker,
                s=34,
                zorder=3,
                color=colour if fill[k] else "none",
                edgecolor=colour if not fill[k] else "0.25",
                linewidth=0.9 if not fill[k] else 0.4,
            )
        x, y = np.log(rows["gmacs"].to_numpy(float)), np.log(rows["energy_per_image_j"].to_numpy(float))
        if len(x) >= 3 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            r2 = 1 - np.sum((y - (intercept + slope * x)) ** 2) / np.sum((y - y.mean()) ** 2)
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(
                np.exp(xs),
                np.exp(intercept + slope * xs),
                "k-" if k == 0 else "k--",
                lw=1.2,
                zorder=2,
                label=f"{config} ({'filled' if fill[k] else 'hollow'}): E ∝ GMACs^{slope:.2f}, "
                f"R² {r2:.2f}, {len(x)} models",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.xaxis)
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("compute per image (GMACs, timm's count, log scale)")
    ax.set_ylabel("energy per image (J, log scale)")
    ax.set_title(f"Energy against compute: {first['gpu_name']}", fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    fit_legend = ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.add_artist(fit_legend)
    handles = [
        plt.Line2D(
            [], [], ls="none", marker=style[f][1], color=style[f][0], markeredgecolor="0.25", markersize=6, label=f
        )
        for f in families
    ]
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="family",
        title_fontsize=8,
        ncol=1 if len(families) <= 24 else 2,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _methods(plt: Any, savings: pd.DataFrame, df: pd.DataFrame, path: Path) -> Path:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    summary = method_savings_by_family(df[df["gpu_name"] == savings["gpu_name"].iloc[0]])
    overall = summary[summary["family"] == "all"].set_index("method")
    methods = sorted(savings["method"].unique(), key=method_order)
    per_model = {m: _per_model(savings[savings["method"] == m]) for m in methods}
    heights = [max(2.4, 0.22 * len(per_model[m]) + 1.2) for m in methods]
    legend_in = 0.65  # the suptitle and the figure's one legend, above the panels
    fig, axes = plt.subplots(
        len(methods),
        1,
        figsize=(9, sum(heights) + legend_in),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, method in zip(axes[:, 0], methods, strict=True):
        rows = per_model[method]
        y = np.arange(len(rows))
        pct = 100.0 * rows["saving_frac"].to_numpy()
        err = 100.0 * np.vstack([rows["saving_frac"] - rows["ci95_low"], rows["ci95_high"] - rows["saving_frac"]])
        same = rows["same_board"].to_numpy(bool)
        for on_one in (True, False):
            sel = same == on_one
            if sel.any():
                ax.errorbar(
                    pct[sel],
                    y[sel],
                    xerr=err[:, sel],
                    fmt="o",
                    ms=4,
                    color="C0",
                    mfc="C0" if on_one else "white",
                    ecolor="0.4",
                    capsize=2,
                    zorder=3,
                )
        agg = overall.loc[method]
        ax.axvspan(100 * agg["ci95_low"], 100 * agg["ci95_high"], color="C1", alpha=0.2, zorder=1)
        ax.axvline(100 * agg["saving_frac"], color="C1", lw=1.5, zorder=2)
        ax.axvline(0, color="k", lw=0.8)
        contexts = sorted({_context(c) for c in savings.loc[savings["method"] == method, "from_config"]})
        ax.set_yticks(y)
        ax.set_yticklabels(
            [
                f"{u.split('@')[0]} ({f})" + (f", {n} pairs" if n > 1 else "")
                for u, f, n in zip(rows["unit_key"], rows["family"], rows["n_pairs"], strict=True)
            ],
            fontsize=7,
        )
        ax.set_ylim(-0.7, len(rows) - 0.3)
        cross = int(agg["n_cross_board"])
        if agg["saving_frac"] >= 0:
            effect = (f"saves {100 * agg['saving_frac']:.0f} % [95 % CI {100 * agg['ci95_low']:.0f}, "
                      f"{100 * agg['ci95_high']:.0f}]")
        else:
            factor, low, high = energy_factor(agg["saving_frac"], agg["ci95_low"], agg["ci95_high"])
            effect = f"costs {factor:.1f}x the energy [95 % CI {low:.1f}, {high:.1f}]"
        ax.set_title(
            f"{_method_title(method)}, from {'; '.join(contexts)}\n{effect} over {int(agg['n_models'])} "
            "models" + (f", {cross} of them only from pairs across boards" if cross else ""),
            fontsize=9.5,
            loc="left",
        )
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("energy saved per image (%; negative: the method costs energy)", fontsize=8)
    # One legend for every panel, above them: inside a panel it would hide the models behind it.
    handles = [
        Line2D([], [], ls="none", marker="o", ms=4, color="C0", label="one model: its two results on one board "
               "(95 % CI of the two measurements)"),
    ]
    if not savings["same_board"].all():
        handles.append(Line2D([], [], ls="none", marker="o", ms=4, color="C0", mfc="white",
                              label="one model: its two results on two boards (their difference is not in the CI)"))
    if any((m["n_pairs"] > 1).any() for m in per_model.values()):
        handles.append(Line2D([], [], ls="none", marker="", label="a model with several pairs (boards): their "
                              "geometric mean, the bar across their CIs"))
    handles += [
        Line2D([], [], color="C1", lw=1.5, label="geometric mean over models"),
        Patch(color="C1", alpha=0.2, label="its 95 % CI (t, across models)"),
    ]
    top = 1.0 - legend_in / fig.get_figheight()
    fig.suptitle(f"Energy saved by each method: {savings['gpu_name'].iloc[0]}", fontsize=11, y=0.998)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0 - 0.3 / fig.get_figheight()), ncol=2,
               fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _boards_note(rows: pd.DataFrame) -> str:
    """A second title line for rows from ``combine_boards`` where some model was measured on several boards
    (``\n22 of them measured on 2 or 3 boards: one point, the geometric mean``), or nothing."""
    several = rows["n_boards"] > 1
    if not several.any():
        return ""
    counts = [str(b) for b in sorted(set(rows.loc[several, "n_boards"]))]
    boards = " or ".join([", ".join(counts[:-1]), counts[-1]] if len(counts) > 1 else counts)
    return f"\n{int(several.sum())} of them measured on {boards} boards: one point each, the geometric mean"


def _short_config(row: pd.Series) -> str:
    """``bf16, batch 256, channels_last`` (eager and NCHW, the defaults, left unsaid)."""
    parts = [str(row["precision"]), f"batch {int(row['batch_size'])}"]
    parts += [n for n in ("channels_last", "compile", "cuda_graphs") if row[n]]
    return ", ".join(parts)


def _per_model(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per model of one method's pairs (``method_savings``), by saving: a model with several pairs (its
    results on several boards) has their geometric-mean saving, an interval from the lowest to the highest end of
    theirs, ``n_pairs``, and ``same_board`` when all its pairs are on one board."""
    work = pairs.assign(_log=np.log1p(-pairs["saving_frac"]))
    out = work.groupby(["unit_key", "family"], as_index=False, sort=False).agg(
        _log=("_log", "mean"),
        ci95_low=("ci95_low", "min"),
        ci95_high=("ci95_high", "max"),
        n_pairs=("_log", "size"),
        same_board=("same_board", "all"),
    )
    out["saving_frac"] = -np.expm1(out["_log"])
    return out.drop(columns="_log").sort_values("saving_frac", kind="mergesort").reset_index(drop=True)


def _method_title(method: str) -> str:
    titles = {
        "bf16": "bf16 autocast instead of fp32",
        "fp16": "fp16 autocast instead of fp32",
        "tf32": "TF32 matmuls instead of fp32",
        "channels_last": "channels_last memory format",
        "compile": "torch.compile",
        "cuda_graphs": "CUDA graphs",
    }
    if method.startswith("batch_"):
        return f"batch size {method.removeprefix('batch_')}"
    return titles.get(method, method)


def _context(config_key: str) -> str:
    """``bs64-bf16-cl0-comp0-graph0-224`` -> ``bs64 bf16 NCHW eager`` (the size dropped: it varies by model)."""
    bs, precision, cl, comp, graph, _ = config_key.split("-")
    how = "+".join(n for n, on in (("compile", comp == "comp1"), ("graphs", graph == "graph1")) if on) or "eager"
    return f"{bs.replace('bs', 'batch ')} {precision} {'channels_last' if cl == 'cl1' else 'NCHW'} {how}"


def _label_points(
    fig: Any,
    ax: Any,
    x: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    others: np.ndarray,
    lines: list[np.ndarray],
    radius_pt: tuple[float, float],
) -> None:
    """Name each point at the spot around it where its label covers the least and is the least ambiguous: an earlier
    label under it costs 30 (text on text cannot be read), a point 10 (points are boxes of ``radius_pt``: (labelled,
    ``others``), (x, y) rows of unlabelled points), a sample of a drawn line (``lines``: (x, y) rows in data units) 2
    per sample, and another point about as near to the label as its own point 10 (a reader would not know which it
    names; a label with a leader line is not ambiguous, but its leader crossing an earlier one costs 10). Never
    outside the axes when a spot inside exists."""
    spots = (
        ((-8, 7), "right"),
        ((9, -12), "left"),
        ((-8, -13), "right"),
        ((9, 7), "left"),
        ((-10, -3), "right"),
        ((10, -3), "left"),
        ((0, 10), "center"),
        ((0, -18), "center"),
        ((-2, 15), "right"),
        ((2, -22), "left"),
        ((-2, -22), "right"),
        ((2, 15), "left"),
        # Farther out, with a leader line: for crowded corners, where every near spot covers something.
        ((-14, 18), "right"),
        ((14, -24), "left"),
        ((-14, -24), "right"),
        ((14, 18), "left"),
        ((-36, -2), "right"),
        ((-28, -34), "right"),
        ((28, -34), "left"),
        ((-28, 30), "right"),
    )
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px_per_pt = fig.dpi / 72.0

    def boxes(points: np.ndarray, half_pt: float) -> list[tuple[float, float, float, float]]:
        if len(points) == 0:
            return []
        h = half_pt * px_per_pt
        return [(cx - h, cy - h, cx + h, cy + h) for cx, cy in ax.transData.transform(points)]

    labelled = np.column_stack([x, y])
    # The labelled points are usually among the others too (all of a slice's points): each counts once.
    others = np.asarray(others, dtype=float).reshape(-1, 2)
    others = others[~(others[:, None, :] == labelled[None, :, :]).all(axis=2).any(axis=1)]
    taken = boxes(labelled, radius_pt[0]) + boxes(others, radius_pt[1])
    line_boxes = [b for line in lines for b in boxes(line, 1.0)]
    centres = ax.transData.transform(np.vstack([labelled, others]))
    slack_px = 4.0 * px_per_pt

    def distance(box: tuple[float, float, float, float], points: np.ndarray) -> np.ndarray:
        dx = np.maximum(np.maximum(box[0] - points[:, 0], points[:, 0] - box[2]), 0.0)
        dy = np.maximum(np.maximum(box[1] - points[:, 1], points[:, 1] - box[3]), 0.0)
        return np.hypot(dx, dy)

    def overlaps(box: tuple[float, float, float, float], within: list[tuple[float, float, float, float]]) -> int:
        return sum(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in within)

    leaders: list[tuple[np.ndarray, np.ndarray]] = []
    placed: list[tuple[float, float, float, float]] = []  # the labels so far

    def crosses(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
        def side(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> float:
            return float((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))

        return side(*a, b[0]) * side(*a, b[1]) < 0 and side(*b, a[0]) * side(*b, a[1]) < 0

    # The most accurate first: the frontier crowds at its expensive end, where labels need the most choice.
    for i in np.argsort(-x, kind="stable"):
        text = labels[i]
        best: tuple[float, Any, tuple[float, float, float, float], Any] | None = None
        for offset, ha in spots:
            far = abs(offset[0]) + abs(offset[1]) > 30
            note = ax.annotate(
                text, (x[i], y[i]), xytext=offset, textcoords="offset points", fontsize=7, ha=ha, color="0.2"
            )
            b = note.get_window_extent(renderer)
            box = (b.x0, b.y0, b.x1, b.y1)
            inside = frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
            # A far spot costs a little: its leader line is harder to follow than a label next to its point.
            cost = 10 * overlaps(box, taken) + 30 * overlaps(box, placed) + 2 * overlaps(box, line_boxes)
            cost += 0 if inside else 1000
            leader = None
            if far:
                leader = (np.array([(b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2]), centres[i])
                cost += 2 + 10 * sum(crosses(leader, other) for other in leaders)
            else:
                near = distance(box, centres)
                cost += 10 * int(np.sum(np.delete(near, i) <= near[i] + slack_px))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, box, leader)
            else:
                note.remove()
            if cost == 0:
                break
        assert best is not None
        _, note, box, leader = best
        if leader is not None:
            # Measured without it (an annotation's extent includes its leader, which always touches its point).
            note.remove()
            ax.annotate(
                text,
                (x[i], y[i]),
                xytext=note.xyann,
                textcoords="offset points",
                fontsize=7,
                ha=note.get_horizontalalignment(),
                color="0.2",
                arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 5},
            )
            leaders.append(leader)
        placed.append(box)


def _plain_log_ticks(axis: Any) -> None:
    """Log-axis ticks as plain numbers (0.02, 0.5, 3) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _num(v: float, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"
