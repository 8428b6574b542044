"""Plot of a calibration: the step response of every source with its model, and amplitude ratio over period.

matplotlib is an optional extra (``pip install wattscope[plot]``); it is imported here only, drawing on an Agg
canvas of its own so that the process-wide backend of an interactive session is left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WattscopeError
from ..response import amplitude_ratio, predicted_reading_w
from .runner import SOURCES, CalibrationReport, power_series

_COLORS = {"samples": "tab:blue", "instant": "tab:orange", "average": "tab:green", "energy_counter": "tab:red"}


def plot_report(report: CalibrationReport, path: str | Path) -> Path:
    """Draw the report's two panels into a PNG at ``path`` and return the path.

    Raises WattscopeError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise WattscopeError(f"plotting needs matplotlib ({e}): pip install 'wattscope[plot]'") from e
    fig = Figure(figsize=(13, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    step_ax, amp_ax = fig.subplots(1, 2)
    _step_panel(step_ax, report)
    _amplitude_panel(amp_ax, report)
    profile = report.profile
    fig.suptitle(f"{profile.gpu_name}, driver {profile.driver_version}: sensor calibration ({profile.created_utc})")
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def _step_panel(ax: Any, report: CalibrationReport) -> None:
    # The whole step for the slow sources, and an inset on the rising edge for the fast ones (~20 ms on H100).
    zoom = ax.inset_axes((0.56, 0.3, 0.42, 0.42))
    _step_curves(ax, report, legend=True)
    _step_curves(zoom, report, legend=False)
    zoom.set_xlim(-40, 120)
    zoom.set_ylim(-0.1, 1.1)
    zoom.set_title("rising edge", fontsize=8)
    zoom.tick_params(labelsize=7)
    zoom.grid(alpha=0.3)
    ax.set_xlabel("time since the rising edge (ms)")
    ax.set_ylabel("(reading - idle) / (busy - idle)")
    ax.set_title("step response (first pass)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)


def _step_curves(ax: Any, report: CalibrationReport, *, legend: bool) -> None:
    first = report.passes[0]
    step = first.segments[0]
    edge_ns = int(step.busy_ns[0, 0])
    t0_ns, t1_ns = step.start_ns, step.end_ns
    dense_ns = np.linspace(t0_ns, t1_ns, 4000).astype(np.int64)
    ax.step([(t0_ns - edge_ns) / 1e6, 0.0, (step.busy_ns[0, 1] - edge_ns) / 1e6, (t1_ns - edge_ns) / 1e6],
            [0, 1, 0, 0], where="post", color="0.6", lw=1, label="load (busy = 1)" if legend else None)
    for source in SOURCES:
        fit = report.fits.get(source)
        series = power_series(first.trace, source)
        if fit is None or series is None:
            continue
        best = fit.best
        swing_w = best.high_w - best.low_w
        t_ns, power_w = series
        keep = (t_ns >= t0_ns) & (t_ns <= t1_ns)
        color = _COLORS[source]
        # Normalised to the fitted levels, so that sources whose idle levels differ share one axis.
        ax.plot((t_ns[keep] - edge_ns) / 1e6, (power_w[keep] - best.low_w) / swing_w, "o", ms=3, color=color,
                label=f"{source} readings" if legend else None)
        model = predicted_reading_w(step.busy_ns, dense_ns, best.response(), 0.0, 1.0)
        ax.plot((dense_ns - edge_ns) / 1e6, model, "-", lw=1.2, color=color,
                label=f"{source} model: {best.response().describe()}" if legend else None)


def _amplitude_panel(ax: Any, report: CalibrationReport) -> None:
    periods_ms = np.linspace(5.0, 120.0, 1200)
    drew = False
    for source in SOURCES:
        fit = report.fits.get(source)
        if fit is None or not fit.amplitudes:
            continue
        drew = True
        color = _COLORS[source]
        points = np.array(fit.amplitudes)
        ax.plot(points[:, 0], points[:, 1], "o", ms=4, color=color, label=f"{source} measured")
        for model, style in [(fit.best, "-")] + [(alt, "--") for alt in fit.alternatives]:
            response = model.response()
            curve = [amplitude_ratio(response, p * 1e6) for p in periods_ms]
            ax.plot(periods_ms, curve, style, lw=1.2, color=color,
                    label=f"{source} {model.kind}{' (best)' if model is fit.best else ''}")
    if not drew:
        ax.text(0.5, 0.5, "no source measured square-wave amplitudes", ha="center", transform=ax.transAxes)
    ax.set_xlabel("square-wave period (ms)")
    ax.set_ylabel("peak-to-peak reading / peak-to-peak power")
    ax.set_title("amplitude ratio over period (50 % duty)")
    ax.set_ylim(-0.02, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
