"""The key findings as matplotlib PNGs: the frontier with its fits, energy against GMACs, and the methods' savings.

``write_figures`` draws from one configuration slice (``select_slice``) and, for energy against GMACs, also the
fp32 baseline slice of the same GPU and batch size when there is one, so that the gap between precisions shows.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .fit import FORMS, FrontierFit, fit_frontier
from .methods import method_savings, method_savings_by_family
from .results import select_slice, slice_label
from .score import score_models

FIGURES = ("frontier.png", "energy_vs_gmacs.png", "method_savings.png")
_FORM_LABEL = {"double_exponential": "double exponential", "exponential": "exponential", "power_law": "power law"}
_BAND_COLOURS = {
    "A": "#1a9850",
    "B": "#91cf60",
    "C": "#d9ef8b",
    "D": "#fee08b",
    "E": "#fdae61",
    "F": "#f46d43",
    "G": "#d73027",
}
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
    rows = rows[rows["top1"].notna()]
    scores = score_models(rows, fit)
    fig, ax = plt.subplots(figsize=(12, 6.2))
    for band in sorted(set(scores["band"].dropna())):
        sel = scores["band"] == band
        ax.scatter(
            rows.loc[sel, "top1"],
            rows.loc[sel, "energy_per_image_j"],
            s=28,
            color=_BAND_COLOURS[band],
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
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("ImageNet-1k top-1 accuracy (%, timm's best weight)")
    ax.set_ylabel("energy per image (J, log scale)")
    ax.set_title(f"Accuracy against energy: {label}, {len(rows)} models", fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    # Outside the axes: any corner inside may hide a model (a frontier point can sit far below the fitted curve).
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    verdict = "\n".join(textwrap.wrap(fit.verdict, 170))
    fig.text(
        0.01,
        0.01,
        verdict + "\nScore bands: energy / fitted frontier at equal accuracy, A ≤ 1.25 ... G > 4.",
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
    )
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _energy_vs_gmacs(plt: Any, df: pd.DataFrame, chosen: pd.DataFrame, path: Path) -> Path:
    first = chosen.iloc[0]
    panels = [(chosen, str(first["precision"]))]
    if first["precision"] != "fp32":
        same = (df["gpu_name"] == first["gpu_name"]) & (df["batch_size"] == first["batch_size"]) & df["baseline"]
        if same.any():
            panels.append((df[same], "fp32"))
    families = sorted(set().union(*(set(p["family"].dropna()) for p, _ in panels)))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>ph*"
    style = {f: (cmap(i % 20), markers[(i // 20) % len(markers)]) for i, f in enumerate(families)}
    fig, ax = plt.subplots(figsize=(10, 6.2))
    fill = {0: True, 1: False}
    for k, (rows, precision) in enumerate(panels):
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
                label=f"{precision} ({'filled' if fill[k] else 'hollow'}): E ∝ GMACs^{slope:.2f}, "
                f"R² {r2:.2f}, {len(x)} models",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.xaxis)
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("compute per image (GMACs, timm's count, log scale)")
    ax.set_ylabel("energy per image (J, log scale)")
    layout = "channels_last" if first["channels_last"] else "NCHW"
    how = "+".join(n for n in ("compile", "cuda_graphs") if first[n]) or "eager"
    ax.set_title(
        f"Energy against compute: {first['gpu_name']}, batch {int(first['batch_size'])}, {layout}, {how}", fontsize=11
    )
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
    summary = method_savings_by_family(df[df["gpu_name"] == savings["gpu_name"].iloc[0]])
    overall = summary[summary["family"] == "all"].set_index("method")
    methods = sorted(savings["method"].unique(), key=lambda m: -len(savings[savings["method"] == m]))
    heights = [max(2.2, 0.22 * (savings["method"] == m).sum() + 1.0) for m in methods]
    fig, axes = plt.subplots(
        len(methods), 1, figsize=(9, sum(heights) + 0.6), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, method in zip(axes[:, 0], methods, strict=True):
        rows = savings[savings["method"] == method].sort_values("saving_frac")
        y = np.arange(len(rows))
        pct = 100.0 * rows["saving_frac"].to_numpy()
        err = 100.0 * np.vstack([rows["saving_frac"] - rows["ci95_low"], rows["ci95_high"] - rows["saving_frac"]])
        ax.errorbar(
            pct,
            y,
            xerr=err,
            fmt="o",
            ms=4,
            color="C0",
            ecolor="0.4",
            capsize=2,
            zorder=3,
            label="one model (95 % CI of its two measurements)",
        )
        agg = overall.loc[method]
        ax.axvspan(
            100 * agg["ci95_low"],
            100 * agg["ci95_high"],
            color="C1",
            alpha=0.2,
            zorder=1,
            label="95 % CI across models",
        )
        ax.axvline(
            100 * agg["saving_frac"],
            color="C1",
            lw=1.5,
            zorder=2,
            label=f"geometric mean: {100 * agg['saving_frac']:.0f} % over {int(agg['n_models'])} models",
        )
        ax.axvline(0, color="k", lw=0.8)
        contexts = sorted({_context(c) for c in rows["from_config"]})
        ax.set_yticks(y)
        ax.set_yticklabels(
            [f"{u.split('@')[0]} ({f})" for u, f in zip(rows["unit_key"], rows["family"], strict=True)], fontsize=7
        )
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(f"{_method_title(method)}, from {'; '.join(contexts)}", fontsize=10, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
        ax.set_xlabel("energy saved per image (%; negative: the method costs energy)", fontsize=8)
    fig.suptitle(f"Energy saved by each method: {savings['gpu_name'].iloc[0]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


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


def _label_points(fig: Any, ax: Any, x: np.ndarray, y: np.ndarray, labels: list[str], others: np.ndarray) -> None:
    """Name each point at the spot around it where its label overlaps the fewest earlier labels and points
    (``others``: (x, y) rows of unlabelled points), never outside the axes when a spot inside exists."""
    spots = (
        ((-7, 6), "right"),
        ((7, -11), "left"),
        ((-7, -12), "right"),
        ((7, 6), "left"),
        ((-9, -3), "right"),
        ((9, -3), "left"),
        ((0, 9), "center"),
        ((0, -16), "center"),
    )
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centres = ax.transData.transform(np.vstack([np.column_stack([x, y]), others]))
    taken = [(cx - 6, cy - 6, cx + 6, cy + 6) for cx, cy in centres]
    for i, text in enumerate(labels):
        best: tuple[float, Any, tuple[float, float, float, float]] | None = None
        for offset, ha in spots:
            note = ax.annotate(
                text, (x[i], y[i]), xytext=offset, textcoords="offset points", fontsize=7, ha=ha, color="0.2"
            )
            b = note.get_window_extent(renderer)
            box = (b.x0, b.y0, b.x1, b.y1)
            inside = frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
            cost = sum(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken)
            cost += 0 if inside else 1000
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, box)
            else:
                note.remove()
            if cost == 0:
                break
        assert best is not None
        taken.append(best[2])


def _plain_log_ticks(axis: Any) -> None:
    """Log-axis ticks as plain numbers (0.02, 0.5, 3) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _num(v: float, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"
