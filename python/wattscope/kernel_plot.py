"""A picture of where the energy went: power over time above the kernel timeline, and the top kernels by energy.

matplotlib is imported lazily and drawn on an Agg canvas owned by the figure (no pyplot state, safe in threads and
on machines without a display).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from .kernels import IDLE, OTHER, UNATTRIBUTED, KernelTimeline

if TYPE_CHECKING:
    import pandas

__all__ = ["plot_kernels"]

_NS_PER_S = 1e9


def plot_kernels(
    path: str | Path,
    t_ns: ArrayLike,
    power_w: ArrayLike,
    timeline: KernelTimeline,
    table: pandas.DataFrame,
    *,
    top_n: int = 8,
    title: str | None = None,
) -> Path:
    """Save a PNG: readings (W) over time with a lane of coloured bands per top kernel (the rest grey, as
    ``[other]``), and a bar chart of the ``top_n`` kernel rows of ``table`` by energy with their uncertainty.

    Args:
        path: the PNG to write.
        t_ns, power_w: the GPU's readings (int ns on CLOCK_MONOTONIC, W), drawn as steps (each reading covers the
            interval since the previous one).
        timeline: the kernels (usually ``Attribution.timeline``).
        table: ``Attribution.table``; the ``[idle]`` and ``[unattributed]`` rows are drawn in the bar chart too.
        top_n: how many kernel names get their own colour and bar.
        title: a title for the figure.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: mismatched readings or a table without the attribution columns.

    Kernel rows beyond the top ``top_n`` are drawn as one bar (their uncertainties added in quadrature).
    """
    import pandas as pd  # a table was passed, so pandas is there

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_kernels needs matplotlib: pip install 'wattscope[plot]'") from None
    t = np.asarray(t_ns)
    p = np.asarray(power_w, dtype=np.float64)
    if t.ndim != 1 or t.shape != p.shape or t.size == 0:
        raise ValueError(f"t_ns and power_w must be non-empty 1-D arrays of one length, got {t.shape} and {p.shape}")
    missing = {"name", "energy_j", "uncertainty_j"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)}: pass Attribution.table")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")

    special = (IDLE, UNATTRIBUTED)
    kernels = table[~table["name"].isin(special)].sort_values("energy_j", ascending=False)
    top = [n for n in kernels["name"].tolist() if n != OTHER][:top_n]
    origin = int(min(t[0], timeline.start_ns.min())) if len(timeline) else int(t[0])

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 1, height_ratios=(3, 1.2, 2.6))
    ax_p = fig.add_subplot(grid[0])
    ax_k = fig.add_subplot(grid[1], sharex=ax_p)
    ax_b = fig.add_subplot(grid[2])
    colours = _palette(len(top))

    x_s = (t - origin) / _NS_PER_S
    ax_p.step(x_s, p, where="pre", color="black", lw=0.9, label="readings")
    ax_p.set_ylabel("power (W)")
    ax_p.grid(alpha=0.3)
    ax_p.tick_params(labelbottom=False)
    if title:
        ax_p.set_title(title)

    keys = timeline.name.astype(str) if timeline.grid is None else _keys_with_grid(timeline, set(top))
    rest_sel = ~np.isin(keys, top)
    lanes = [*top, OTHER] if rest_sel.any() else list(top)
    for lane, name in enumerate(lanes):
        sel = keys == name if name != OTHER else rest_sel
        if not sel.any():
            continue
        x0 = (timeline.start_ns[sel] - origin) / _NS_PER_S
        w = (timeline.end_ns[sel] - timeline.start_ns[sel]) / _NS_PER_S
        colour = colours[lane] if name != OTHER else (0.6, 0.6, 0.6)
        spans = list(zip(x0.tolist(), w.tolist(), strict=True))
        ax_k.broken_barh(spans, (lane - 0.4, 0.8), facecolors=colour)
        # The same bands, faint and full height, behind the power trace, so a power level reads against what ran.
        ax_p.broken_barh(spans, (0, 1), facecolors=colour, alpha=0.18, lw=0, transform=ax_p.get_xaxis_transform())
    ax_k.set_yticks(range(len(lanes)), [_short(n) for n in lanes], fontsize=7)
    ax_k.set_ylim(len(lanes) - 0.5, -0.5)
    ax_k.set_xlabel("time (s)")
    ax_k.grid(axis="x", alpha=0.3)

    bars = kernels[kernels["name"].isin(top)]
    rest = kernels[~kernels["name"].isin(top)]
    if len(rest):
        # Everything outside the top as one bar; uncertainties in quadrature (taken as independent).
        merged = pd.DataFrame({"name": [f"{OTHER} ({len(rest)} names)" if len(rest) > 1 else rest["name"].iloc[0]],
                               "energy_j": [rest["energy_j"].sum()],
                               "uncertainty_j": [float(np.sqrt(np.sum(np.square(rest["uncertainty_j"]))))]})
        bars = pd.concat([bars, merged])
    shown = pd.concat([bars, table[table["name"].isin(special)]])
    names = shown["name"].tolist()
    energy = shown["energy_j"].to_numpy(dtype=float)
    err = np.nan_to_num(shown["uncertainty_j"].to_numpy(dtype=float))
    bar_colours = [colours[top.index(n)] if n in top else (0.6, 0.6, 0.6) for n in names]
    y = np.arange(len(names))
    ax_b.barh(y, energy, xerr=err, color=bar_colours, capsize=3, ecolor="black")
    ax_b.set_yticks(y, [_short(n) for n in names], fontsize=7)
    ax_b.invert_yaxis()
    ax_b.set_xlabel("energy (J), error bars: uncertainty_j")
    ax_b.grid(axis="x", alpha=0.3)
    ax_b.axvline(0, color="black", lw=0.6)

    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _keys_with_grid(timeline: KernelTimeline, top: set[str]) -> np.ndarray:
    # A table grouped by name+grid names its rows "name <<<grid>>>"; one grouped by name uses the bare name.
    assert timeline.grid is not None
    with_grid = np.array([f"{n} <<<{g}>>>" for n, g in zip(timeline.name.tolist(), timeline.grid.tolist(),
                                                            strict=True)], dtype=object)
    return with_grid if any(k in top for k in set(with_grid.tolist())) else timeline.name.astype(str)


def _short(name: str, width: int = 44) -> str:
    # Kernel names share long prefixes (namespaces, templates): keep both ends so that labels stay distinct.
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]
